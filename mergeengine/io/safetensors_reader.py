"""Lazy reader for safetensors checkpoints: a single file, or a folder (single or sharded)."""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import ST_TO_TORCH, FolderCheckpoint, TensorInfo

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# Bytes read through one safe_open mapping before it is dropped and reopened (see read()).
REMAP_BYTES = 64 << 20
SINGLE_NAME = "model.safetensors"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors file's JSON header without reading tensor data.

    Raises:
        ModelError: the file is missing, truncated or not safetensors.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError("file is too short to be safetensors (truncated?)", file=str(path))
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise ModelError("header length exceeds file size: not safetensors or truncated", file=str(path))
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelError("file not found", file=str(path)) from None
    except PermissionError:
        raise ModelError("permission denied", file=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError("header is not valid JSON: not a safetensors file", file=str(path)) from None
    data_len = size - 8 - n
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        raise ModelError(
            f"truncated: header describes {end} data bytes but the file holds {data_len}", file=str(path)
        )
    return header


class SafetensorsCheckpoint(FolderCheckpoint):
    """A safetensors model: a folder with ``model.safetensors`` or shards + index, or one file.

    Args:
        path: the folder or the ``.safetensors`` file.

    Raises:
        ModelError: nothing readable at ``path``.

    Example:
        >>> ckpt = SafetensorsCheckpoint(Path("models/base"))  # doctest: +SKIP
        >>> ckpt.tensors()["model.norm.weight"].shape  # doctest: +SKIP
        (64,)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        files = self._find_files()
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._files = files
        for file in files:
            header = read_safetensors_header(file)
            items = [(k, v) for k, v in header.items() if k != "__metadata__"]
            items.sort(key=lambda kv: kv[1]["data_offsets"][0])
            for name, entry in items:
                dtype = ST_TO_TORCH.get(entry["dtype"])
                if dtype is None:
                    raise ModelError(f"tensor '{name}' has unsupported dtype {entry['dtype']}", file=str(file))
                if name in self._infos:
                    raise ModelError(f"tensor '{name}' appears in two shards", file=str(file))
                self._infos[name] = TensorInfo(tuple(entry["shape"]), dtype, str(file))
                self._file_of[name] = file
        # safe_open handles are per thread: the executor reads ahead in a background thread.
        self._local = threading.local()

    def _find_files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise ModelError("model not found (no such file or folder)", file=str(p))
        if p.is_file():
            if p.suffix != ".safetensors":
                raise ModelError("expected a .safetensors file or a model folder", file=str(p))
            return [p]
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ModelError("index is not valid (no weight_map)", file=str(index)) from None
            names = list(dict.fromkeys(weight_map.values()))
            files = [p / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"shards listed in the index are missing: {', '.join(missing)}", file=str(index))
            return files
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        found = sorted(p.glob("*.safetensors"))
        if found:
            return found
        if any(p.glob("*.bin")):
            raise ModelError(
                "folder holds only PyTorch .bin weights; set 'allow_pickle: true' on the load step to read them",
                file=str(p),
            )
        raise ModelError("no model.safetensors, shards or index in this folder", file=str(p))

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor through a memory-mapped ``safe_open`` handle.

        A handle is dropped (its mapping unmapped) after :data:`REMAP_BYTES` have been read
        through it: mapped pages count in the process's RSS for as long as the mapping lives, so
        this keeps file-backed RSS at about one window per input instead of the whole input.
        """
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"tensor '{name}' not in checkpoint", file=self.source)
        handles = self._local.__dict__.setdefault("handles", {})
        entry = handles.get(file)
        if entry is None:
            try:
                entry = handles[file] = [safe_open(str(file), framework="pt", device="cpu"), 0]
            except Exception as exc:  # safetensors raises its own types
                raise ModelError(f"cannot open: {exc}", file=str(file)) from None
        try:
            tensor = entry[0].get_tensor(name)
        except Exception as exc:
            raise ModelError(f"cannot read tensor '{name}': {exc}", file=str(file)) from None
        entry[1] += tensor.nbytes
        if entry[1] >= REMAP_BYTES:
            del handles[file]
        return tensor

    def close(self) -> None:
        """Drop this thread's open ``safe_open`` handles (others go with their threads)."""
        self._local = threading.local()
