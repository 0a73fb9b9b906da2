"""The safetensors reader's file mappings, and handing their pages back behind a streaming pass.

The reader maps each tensor's bytes copy-on-write (``MAP_PRIVATE``) and registers the mapping
here, keyed by the tensor's storage (which every view of the tensor shares). A pass that reads
such a tensor front to back releases the pages behind its cursor with ``MADV_DONTNEED``
(:class:`Cursor`), so the process holds the pages near the cursor instead of the whole tensor.
For a page of a private file mapping that was never written this only drops the process's
reference to the page-cache page: touching it again maps the same bytes from the page cache
(or reads them from the file again), so the math cannot tell.

A page that was written is private anonymous memory, and releasing it would lose the write.
Every candidate page is therefore looked up in ``/proc/self/pagemap`` first and only pages that
are file pages, or were never faulted in, are released; where the page map cannot be read
nothing is. Memory not registered here (results, copies, other devices' tensors) is never
released, whatever its address. A mapping stays registered, and mapped, while any tensor over
it lives: the registry holds the mapping, and drops it when the storage is freed.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

PAGE_BYTES = mmap.PAGESIZE
#: Bytes a cursor releases at once (one read of the page map and one ``madvise``): the pages
#: a streaming pass keeps per input.
RELEASE_BYTES = 2 << 20

# page map entry bits (plain ints: numpy is imported lazily, only when pages are released)
_PRESENT = 1 << 63
_SWAPPED = 1 << 62
_FILE = 1 << 61  # a file page (or shared anonymous memory)
_PAGEMAP_ENTRY = 8


@dataclass(frozen=True)
class Mapping:
    """One mapping of the reader: the ``mmap`` object and the address of its first byte."""

    mapped: mmap.mmap
    address: int


_REGISTRY: weakref.WeakKeyDictionary[torch.UntypedStorage, Mapping] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def register(tensor: torch.Tensor, mapped: mmap.mmap, data_offset: int) -> None:
    """Record that ``tensor``'s storage is the private file mapping ``mapped``, its data starting
    ``data_offset`` bytes into it. Only the reader calls this, for mappings it never writes."""
    with _LOCK:
        _REGISTRY[tensor.untyped_storage()] = Mapping(mapped, tensor.data_ptr() - data_offset)


def mapping_of(tensor: torch.Tensor) -> Mapping | None:
    """The registered mapping under ``tensor`` (any view of a tensor the reader mapped), or None."""
    if tensor.device.type != "cpu":
        return None
    with _LOCK:
        return _REGISTRY.get(tensor.untyped_storage())


def live_mappings() -> int:
    """How many registered mappings are alive (their tensors not yet freed)."""
    with _LOCK:
        return len(_REGISTRY)


def _page_flags(address: int, pages: int) -> np.ndarray | None:
    """The page map entries of ``pages`` pages from ``address`` (page aligned), or None if unreadable."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.pread(fd, pages * _PAGEMAP_ENTRY, address // PAGE_BYTES * _PAGEMAP_ENTRY)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != pages * _PAGEMAP_ENTRY:
        return None
    return np.frombuffer(raw, dtype=np.uint64)


def _runs(ok: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the runs of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], ok, [False])).astype(np.int8)))
    yield from zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)


def release(mapping: Mapping, begin: int, end: int) -> int:
    """Release the whole pages in bytes ``[begin, end)`` of ``mapping`` that were never written.

    Returns:
        The bytes released (0 where the page map is unreadable or every page was written).
    """
    lo = begin - begin % PAGE_BYTES
    hi = min(end - end % PAGE_BYTES, -(-len(mapping.mapped) // PAGE_BYTES) * PAGE_BYTES)
    if hi <= lo or not sys.platform.startswith("linux"):
        return 0
    flags = _page_flags(mapping.address + lo, (hi - lo) // PAGE_BYTES)
    if flags is None:
        return 0
    present = (flags & np.uint64(_PRESENT)) != 0
    written = (present & ((flags & np.uint64(_FILE)) == 0)) | ((flags & np.uint64(_SWAPPED)) != 0)  # anonymous
    done = 0
    for first, last in _runs(~written):
        try:  # the mmap clamps the length to its size; the kernel rounds it to the page
            mapping.mapped.madvise(mmap.MADV_DONTNEED, lo + first * PAGE_BYTES, (last - first) * PAGE_BYTES)
        except (OSError, ValueError):
            return done
        done += (last - first) * PAGE_BYTES
    return done


class Cursor:
    """Releases the mapped pages of a flat tensor behind a front-to-back pass over it.

    A no-op for tensors the reader did not map, and for non-contiguous ones.

    Example:
        >>> cursor = Cursor(flat)  # doctest: +SKIP
        >>> for start, end in spans(flat.numel(), 1 << 17):  # doctest: +SKIP
        ...     scratch[: end - start].copy_(flat[start:end])
        ...     cursor.advance(end)
    """

    def __init__(self, flat: torch.Tensor) -> None:
        self._mapping = mapping_of(flat) if flat.dim() == 1 and flat.stride(0) == 1 else None
        if self._mapping is None:
            return
        self._item = flat.element_size()
        self._numel = flat.numel()
        self._first = flat.data_ptr() - self._mapping.address  # byte offset of flat[0] in the mapping
        self._done = self._first

    def advance(self, end: int) -> None:
        """Entries ``[0, end)`` have been read: release their pages in steps of :data:`RELEASE_BYTES`
        (all of them once ``end`` is the tensor's end)."""
        if self._mapping is None:
            return
        upto = self._first + end * self._item
        last = end >= self._numel
        if not last and upto - self._done < RELEASE_BYTES:
            return
        if last:
            upto += -upto % PAGE_BYTES  # the tail of the last page: the file's next bytes, never written
        release(self._mapping, self._done, upto)
        self._done = upto - upto % PAGE_BYTES
