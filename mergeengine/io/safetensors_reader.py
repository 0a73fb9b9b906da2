"""Lazy reader for safetensors checkpoints: a single file, or a folder (single or sharded)."""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from mergeengine.errors import ModelError
from mergeengine.io import mapped as mapped_pages
from mergeengine.io.checkpoint import ST_TO_TORCH, FolderCheckpoint, TensorInfo

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


#: safetensors' own limit on the JSON header (100 MB).
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors file's JSON header without reading tensor data (validated: see :func:`validate_header`).

    Raises:
        ModelError: the file is missing, truncated, not safetensors, or its header is malformed.
    """
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The validated header and the file offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError("file is too short to be safetensors (truncated?)", file=str(path))
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ModelError("header length exceeds file size: not safetensors or truncated", file=str(path))
            text = f.read(n)
            if not text.startswith(b"{"):
                raise ModelError("header is not a JSON object: not a safetensors file", file=str(path))
            header = json.loads(text)
    except FileNotFoundError:
        raise ModelError("file not found", file=str(path)) from None
    except PermissionError:
        raise ModelError("permission denied", file=str(path)) from None
    except IsADirectoryError:
        raise ModelError("is a folder, not a safetensors file", file=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError("header is not valid JSON: not a safetensors file", file=str(path)) from None
    validate_header(header, size - 8 - n, path)
    return header, 8 + n


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with one tensor entry's fields (None: well-formed)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "must be an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
        return f"has unsupported dtype {dtype!r} (supported: {', '.join(ST_TO_TORCH)})"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has a malformed shape {shape!r} (a list of non-negative integers)"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        return f"has malformed data_offsets {offsets!r} (two non-negative integers)"
    return None


def validate_header(header: Any, data_bytes: int, path: Path) -> None:
    """Check a parsed header as safetensors itself does, so no header byte is ever read as a weight.

    Every entry but ``__metadata__`` (an object of strings) has a known dtype, a shape of
    non-negative integers and two offsets whose span is exactly the shape's bytes; sorted by
    offset, the tensors tile the data section from 0 to its end: contiguous, in range, no overlap.

    Raises:
        ModelError: one line naming the file and the tensor.
    """
    if not isinstance(header, dict):
        raise ModelError("header is not a JSON object: not a safetensors file", file=str(path))
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelError("header __metadata__ must map strings to strings", file=str(path))
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(name, entry)
        if problem is not None:
            raise ModelError(f"tensor '{name}' {problem}: corrupt header", file=str(path))
        begin, end = entry["data_offsets"]
        need = math.prod(entry["shape"]) * torch.empty((), dtype=ST_TO_TORCH[entry["dtype"]]).element_size()
        if end - begin != need:
            raise ModelError(f"tensor '{name}' holds {end - begin} bytes but its shape {entry['shape']} and dtype "
                             f"{entry['dtype']} need {need}: corrupt header", file=str(path))
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap at byte {at}"
            raise ModelError(f"tensor '{name}' {what} (data_offsets [{begin}, {end}]): corrupt header", file=str(path))
        at = end
    if at != data_bytes:
        how = "truncated" if at > data_bytes else "trailing bytes"
        raise ModelError(f"{how}: header describes {at} data bytes but the file holds {data_bytes}", file=str(path))


def index_shards(index: Path) -> list[str]:
    """The shard names an index lists, each a plain name inside the index's folder.

    Raises:
        ModelError: the index is not valid JSON, has no ``weight_map`` of strings, or names a file
            outside its folder (an absolute path, ``..``).
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelError("index is not valid (no weight_map)", file=str(index)) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError("index weight_map must map tensor names to shard file names", file=str(index))
    names = list(dict.fromkeys(weight_map.values()))
    for n in names:
        parts = PurePosixPath(n.replace("\\", "/")).parts
        if not n or n.startswith(("/", "~")) or ".." in parts or "\x00" in n:
            raise ModelError(f"index names shard '{n}' outside the model folder: refused", file=str(index))
    return names


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
            for name, entry in items:  # validated by _read_header
                if name in self._infos:
                    raise ModelError(f"tensor '{name}' appears in two shards", file=str(file))
                self._infos[name] = TensorInfo(tuple(entry["shape"]), ST_TO_TORCH[entry["dtype"]], str(file))
                self._file_of[name] = file
                begin, end = entry["data_offsets"]
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
            files = [p / n for n in index_shards(index)]
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

        Each tensor gets its own mapping, unmapped when the tensor is freed. The kernel is asked
        to read the bytes into the page cache ahead of use (``MADV_WILLNEED``, asynchronous), but
        the pages join the process only as the math touches them (page-cache hits): a tensor
        read ahead costs no RSS until its turn, and an input counts in the RSS only from its first
        use until it is freed. Writes to the tensor go to private pages, never to the file.
        The mapping is registered in :mod:`mergeengine.io.mapped`, so streaming passes over the
        tensor release the pages behind their cursor (pages that were written are kept).
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
            mapped.madvise(mmap.MADV_WILLNEED)
        except (OSError, ValueError, AttributeError):  # no madvise here: pages are read on first touch
            pass
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        count = (end - begin) // itemsize
        if (begin - start) % itemsize:  # unaligned data (old writers): copy once
            raw = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin - start, count=end - begin)
            return raw.clone().view(info.dtype).view(info.shape)
        tensor = torch.frombuffer(mapped, dtype=info.dtype, offset=begin - start, count=count)
        mapped_pages.register(tensor, mapped, begin - start)
        return tensor.view(info.shape)

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

