"""The reader interface every input format implements (safetensors folders, single files, GGUF).

A checkpoint is opened from headers only: names, shapes and dtypes are known without reading data,
so the whole plan (and its memory estimate) can be built before any weight is touched. Data is
read one tensor at a time with :meth:`Checkpoint.read`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeengine.io.meta import TensorMeta

DTYPE_BYTES: dict[torch.dtype, int] = {
    torch.float64: 8,
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.int64: 8,
    torch.int32: 4,
    torch.int16: 2,
    torch.int8: 1,
    torch.uint8: 1,
    torch.bool: 1,
}

# safetensors dtype strings <-> torch dtypes
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}


@dataclass(frozen=True)
class TensorInfo(TensorMeta):
    """What a checkpoint's headers say about one tensor (``dtype``: what :meth:`Checkpoint.read` returns).

    Attributes:
        file: the file holding it (for messages and provenance).
    """

    file: str = ""


class Checkpoint(ABC):
    """A model on disk, opened lazily.

    Implementations: :class:`mergeengine.io.safetensors_reader.SafetensorsCheckpoint`,
    :class:`mergeengine.io.gguf_reader.GGUFCheckpoint`.
    """

    #: where the model came from (a folder, a file); used in messages.
    source: str
    #: how the load step's ``model`` string was resolved (set by :func:`mergeengine.io.resolve.open_checkpoint`).
    resolved: Any = None

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Names -> header information, in the checkpoint's natural order. Reads no tensor data."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (CPU), in the dtype given by :meth:`tensors`."""

    @abstractmethod
    def config(self) -> dict[str, Any] | None:
        """The model's Hugging Face ``config.json`` as a dict, or None when there is none."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files tensor data is read from (hashed for provenance)."""

    def support_sources(self) -> dict[str, Path]:
        """Tokenizer and generation files copied into an output: name -> real source file.

        Raises:
            ModelError: a file is not a plain file inside the model's folder.
        """
        return {}

    @abstractmethod
    def write_support_files(self, dest: Path) -> list[str]:
        """Write tokenizer and generation files (not config.json, not weights) into ``dest``.

        Returns the names of the files written. Folders copy what they have; GGUF files build
        them from metadata.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open file handles."""


# Files copied from a model folder into the output next to the weights.
SUPPORT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


class FolderCheckpoint(Checkpoint):
    """Shared behaviour of checkpoints that live in a Hugging Face model folder.

    Subclasses fill ``folder``, ``_files`` (weight files) and ``_infos`` (tensor headers).
    """

    folder: Path
    _files: list[Path]
    _infos: dict[str, TensorInfo]

    def tensors(self) -> dict[str, TensorInfo]:
        """Names -> header information, in file order."""
        return self._infos

    def config(self) -> dict[str, Any] | None:
        """The folder's config.json, if any."""
        from mergeengine.errors import ModelError

        cfg = self.folder / "config.json"
        if not cfg.is_file():
            return None
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"config.json is not valid JSON: {exc}", file=str(cfg)) from None

    def weight_files(self) -> list[Path]:
        """The weight files read."""
        return list(self._files)

    def support_sources(self) -> dict[str, Path]:
        """The tokenizer and generation files beside the weights, each confined to the model's folder.

        Raises:
            ModelError: one of them is a symlink that leads outside the folder, or not a plain file.
        """
        root = getattr(self.resolved, "root", None) or self.folder
        return {name: confined_file(self.folder / name, root, what=name)
                for name in SUPPORT_FILES if os.path.lexists(self.folder / name)}

    def write_support_files(self, dest: Path) -> list[str]:
        """Copy tokenizer and generation files found beside the weights."""
        sources = self.support_sources()
        for name, src in sources.items():
            shutil.copyfile(src, dest / name)
        return list(sources)


def confined_file(path: Path, root: Path, *, what: str) -> Path:
    """The real path of ``path``, which must be a plain file inside ``root`` once symlinks are resolved.

    Args:
        path: the file as named (inside a model folder).
        root: the folder it must stay in (a model folder; for hub models, the repo's cache folder,
            whose snapshots link to its blobs).
        what: how to name the file in messages.

    Raises:
        ModelError: missing, outside ``root``, or not a regular file (a folder, a device, a FIFO).
    """
    from mergeengine.errors import ModelError

    try:
        real = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise ModelError(f"{what} not found", file=str(path)) from None
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"{what} cannot be resolved: {exc}", file=str(path)) from None
    inside = Path(os.path.realpath(root))
    if inside not in real.parents:
        raise ModelError(f"{what} resolves to {real}, outside the model folder {inside}: refused", file=str(path))
    if not stat.S_ISREG(real.stat().st_mode):
        raise ModelError(f"{what} is not a plain file", file=str(path))
    return real
