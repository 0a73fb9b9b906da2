"""Reader for PyTorch ``.bin`` checkpoints (``pytorch_model.bin`` or shards + index).

Pickle files can run code when loaded, so they are read only when a load step sets
``allow_pickle: true``, and even then with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers. ``mmap=True`` keeps the data on disk: opening reads
the pickle (names, shapes, dtypes) and :meth:`TorchBinCheckpoint.read` copies one tensor out.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import DTYPE_BYTES, FolderCheckpoint, TensorInfo
from mergeengine.io.safetensors_reader import index_shards

LOG = logging.getLogger(__name__)

TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_SINGLE_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# *.bin files in model folders that are not weights
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"})


def _weight_bins(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.bin") if f.name not in NOT_WEIGHTS)


def has_torch_weights(folder: Path) -> bool:
    """Whether ``folder`` holds ``pytorch_model.bin``, an index, or any ``*.bin`` file."""
    return (
        (folder / TORCH_INDEX_NAME).is_file()
        or (folder / TORCH_SINGLE_NAME).is_file()
        or bool(_weight_bins(folder))
    )


def _unpickler_reason(exc: Exception) -> str:
    """The useful line of torch's weights_only refusal (whose preamble suggests weights_only=False)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.partition("WeightsUnpickler error:")[2].strip()
        if line and not line.startswith(
            ("Weights only load failed", "Check the documentation", "Please file")
        ):
            return line.rstrip(".")
    return "unpickling failed"


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file format allows it."""
    try:
        try:
            obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            # legacy (pre-1.6, non-zip) format cannot be memory-mapped
            LOG.debug("%s: legacy torch format, loading without mmap", path)
            obj = torch.load(path, weights_only=True, mmap=False, map_location="cpu")
    except FileNotFoundError:
        raise ModelError("file not found", file=str(path)) from None
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"refused to load: the pickle holds more than tensors ({_unpickler_reason(exc)}); convert it to "
            "safetensors in a sandbox you trust",
            file=str(path),
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... on corrupt files
        raise ModelError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})", file=str(path)
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"expected a state dict, found {type(obj).__name__}", file=str(path))
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class TorchBinCheckpoint(FolderCheckpoint):
    """A PyTorch checkpoint: a folder with ``pytorch_model.bin`` or shards + index, or one file.

    Only open these for load steps with ``allow_pickle: true``.

    Args:
        path: the folder, or a ``.bin``/``.pt``/``.pth`` file.

    Raises:
        ModelError: nothing readable, a shard missing, or the pickle holds more than tensors.

    Example:
        >>> ckpt = TorchBinCheckpoint(Path("models/old"))  # doctest: +SKIP
        >>> ckpt.read("model.norm.weight").shape  # doctest: +SKIP
        torch.Size([64])
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self._files = self._find_files()
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        # mmap-backed state dicts: virtual memory only, pages are read on access
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self._files:
            sd = _load_state_dict(file)
            for name, t in sd.items():
                if t.dtype not in DTYPE_BYTES:
                    raise ModelError(f"tensor '{name}' has unsupported dtype {t.dtype}", file=str(file))
                if name in self._infos:
                    raise ModelError(f"tensor '{name}' appears in two shards", file=str(file))
                self._infos[name] = TensorInfo(tuple(t.shape), t.dtype, str(file))
                self._file_of[name] = file
            self._loaded[file] = sd

    def _find_files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise ModelError("model not found (no such file or folder)", file=str(p))
        if p.is_file():
            if p.suffix not in TORCH_SUFFIXES:
                raise ModelError("expected a .bin/.pt/.pth file or a model folder", file=str(p))
            return [p]
        index = p / TORCH_INDEX_NAME
        if index.is_file():
            files = [p / n for n in index_shards(index)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelError(
                    f"shards listed in the index are missing: {', '.join(missing)}", file=str(index)
                )
            return files
        if (p / TORCH_SINGLE_NAME).is_file():
            return [p / TORCH_SINGLE_NAME]
        found = _weight_bins(p)
        if found:
            return found
        raise ModelError("no pytorch_model.bin, shards or index in this folder", file=str(p))

    def read(self, name: str) -> torch.Tensor:
        """Copy one tensor out of the memory-mapped file (contiguous, not sharing storage)."""
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"tensor '{name}' not in checkpoint", file=self.source)
        sd = self._loaded.get(file)
        if sd is None:
            sd = self._loaded[file] = _load_state_dict(file)
        try:
            return sd[name].clone(memory_format=torch.contiguous_format)
        except Exception as exc:
            raise ModelError(f"cannot read tensor '{name}': {exc}", file=str(file)) from None

    def close(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._loaded.clear()
