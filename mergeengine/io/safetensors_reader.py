"""Lazy reader for safetensors checkpoints: a single file, or a folder (single or sharded)."""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import ST_TO_TORCH, FolderCheckpoint, TensorInfo

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Linux 5.14+: fault a mapping's pages in with one call (the read-ahead thread pays, not the math).
MADV_POPULATE_READ = 22


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors file's JSON header without reading tensor data.

    Raises:
        ModelError: the file is missing, truncated or not safetensors.
    """
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and the file offset where tensor data starts."""
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
    return header, 8 + n


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
        self._span: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor's data
        self._files = files
        for file in files:
            header, data_start = _read_header(file)
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
                begin, end = (int(x) for x in entry["data_offsets"])
                expected = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
                if end - begin != expected:
                    raise ModelError(f"tensor '{name}' holds {end - begin} bytes but its shape {entry['shape']} "
                                     f"and dtype {entry['dtype']} need {expected}: corrupt header", file=str(file))
                self._span[name] = (data_start + begin, data_start + end)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

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
        """Map one tensor's bytes (copy-on-write) and return a tensor over them: no copy.

        Each tensor gets its own mapping, faulted in at once (``MADV_POPULATE_READ``, so the
        read-ahead thread pays for the page faults) and unmapped when the tensor is freed: mapped
        input pages count in the process's RSS only while a task still needs them. Writes to the
        tensor go to private pages, never to the file.
        """
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"tensor '{name}' not in checkpoint", file=self.source)
        info = self._infos[name]
        begin, end = self._span[name]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd(file), end - start, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read tensor '{name}': {exc}", file=str(file)) from None
        try:
            mapped.madvise(MADV_POPULATE_READ)
        except (OSError, ValueError):  # older kernels: pages fault in on first touch
            pass
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        count = (end - begin) // itemsize
        if (begin - start) % itemsize:  # unaligned data (old writers): copy once
            raw = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin - start, count=end - begin)
            return raw.clone().view(info.dtype).view(info.shape)
        return torch.frombuffer(mapped, dtype=info.dtype, offset=begin - start, count=count).view(info.shape)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as exc:
                    raise ModelError(f"cannot open: {exc.strerror}", file=str(file)) from None
            return fd

    def close(self) -> None:
        """Close the open files (tensors already read stay valid: their mappings hold the data)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

