"""Process-level tuning for long merges: torch's thread count and glibc's allocator.

Threads: most merges are memory-bound, and mergeengine keeps one core busy with its own background
threads (read-ahead, write-behind, input hashing). torch's intra-op pool sized to every core then
fights them: on a 2-core machine with one core busy, an elementwise op on 1M floats took 7.5 ms
with 2 torch threads and 0.35 ms with 1, and task_arithmetic on the TinyLlama shape took 15 s
instead of 11 s. :func:`set_threads` defaults to all cores but one. Ops whose math dominates their
I/O (TIES, DARE, DP/DPA: dozens of float32 ops per entry, see ``Op.compute_bound``) leave the
background threads idle most of the time; for their tasks the executor calls
:func:`use_threads`, which hands the pool every core (TIES 66 -> 47 s, dare_ties 68 -> 45 s,
DPPA 80 -> 44 s on the TinyLlama shape, 2 cores). Inside such a task, the stretches that are
mostly single-threaded numpy go back to all cores but one (:func:`numpy_threads`), and DARE merges,
serial draws and numpy masks throughout, later became memory-bound tasks again (a helper thread
draws ahead). An explicit ``--threads`` fixes the count.

Allocator:

A merge allocates and frees tensors of the same few sizes over and over (one layer after
another). With glibc's defaults every large tensor is a fresh ``mmap``: its pages are faulted in
(zeroed by the kernel) on first touch and returned with ``munmap`` when freed, and on this class
of machine touching fresh memory runs at only ~2 GiB/s. Raising the mmap and trim thresholds keeps
freed blocks in the heap for the next tensor of the same size: a bf16 -> float32 conversion of a
5632x2048 tensor drops from ~100 ms to ~40 ms. Peak memory is unchanged (the heap holds what the
peak needed); the memory is simply not handed back between tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

LOG = logging.getLogger(__name__)
T = TypeVar("T")

def default_threads() -> int:
    """All usable cores but one (for mergeengine's I/O threads), at least 1."""
    return max(1, all_cores() - 1)


def all_cores() -> int:
    """Usable cores, at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (``None``: :func:`default_threads`). Returns it.

    ``None`` also turns on the per-task choice of :func:`use_threads`; a given count turns it off.
    """
    import torch

    global _AUTO, _CURRENT
    n = threads if threads and threads > 0 else default_threads()
    _AUTO = not (threads and threads > 0)
    torch.set_num_threads(n)
    _CURRENT = n
    LOG.debug("torch intra-op threads: %d%s", n, " (all cores for compute-bound ops)" if _AUTO else "")
    return n


def use_threads(compute_bound: bool) -> int | None:
    """Size torch's pool for the next task: every core when ``compute_bound``, else all but one.

    Does nothing (returns None) unless :func:`set_threads` was called without a count, so a
    library caller's or ``--threads``'s setting is never overridden. Cheap when nothing changes.
    """
    if not _AUTO:
        return None
    n = all_cores() if compute_bound else default_threads()
    _resize(n)
    return n


def _resize(n: int) -> None:
    """torch's intra-op pool to ``n`` threads, only when that changes it."""
    global _CURRENT
    if n != _CURRENT:
        import torch

        torch.set_num_threads(n)
        _CURRENT = n


@contextlib.contextmanager
def numpy_threads() -> Iterator[None]:
    """Within the block, torch's pool is sized as for a memory-bound task (all cores but one).

    For work that interleaves single-threaded numpy passes with torch ops (TIES's and DPA's sampled
    windows, DP's outlier counts; DARE merges, whose draws and masks are serial throughout, are
    memory-bound tasks as a whole): after each parallel torch op, OpenMP's workers
    spin for a while before they sleep, and on a 2-core machine that spin takes the core the
    numpy pass and the read-ahead/write-behind threads need. TIES's selection pass on the TinyLlama
    shape took 16.8 s with two torch threads and 10.2 s with one. The previous size is restored on
    exit. Does nothing unless :func:`set_threads` was called without a count (like
    :func:`use_threads`).
    """
    before = _CURRENT
    if not _AUTO or before is None:
        yield
        return
    use_threads(False)
    try:
        yield
    finally:
        _resize(before)


def run_ahead(produce: Callable[[int, int], T], count: int, name: str) -> Iterator[T]:
    """``produce(i, i % 2)`` for ``i`` in ``range(count)``, each computed one item ahead of the
    caller in a helper thread (named ``name``).

    For chunk loops whose producing half (torch ops, random draws) releases the GIL: it runs on
    another core while the caller consumes the previous item. ``i % 2`` names the buffer slot to
    write, so a producer needs two sets of buffers: an item is valid until the next one is
    requested. Errors are raised in the caller; stopping early waits for the item in flight, so
    nothing outlives the loop. With fewer than two items everything runs inline.
    """
    if count < 2:
        yield from (produce(i, i % 2) for i in range(count))
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        ahead = pool.submit(produce, 0, 0)
        for i in range(count):
            item = ahead.result()
            if i + 1 < count:  # writes the other slot: the caller is done with it
                ahead = pool.submit(produce, i + 1, (i + 1) % 2)
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_AUTO = False
_CURRENT: int | None = None


def libc() -> ctypes.CDLL | None:
    """The C library (glibc or another libc) loaded once with errno, or None where there is none."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC: ctypes.CDLL | bool | None = None
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE = False


def reuse_freed_memory(max_block_bytes: int = 64 << 20) -> bool:
    """Ask glibc to keep freed blocks up to ``max_block_bytes`` for reuse (Linux/glibc only).

    64 MiB covers the per-layer tensors of 7B-class models (in float32), which are allocated
    over and over; the few larger ones (embeddings, lm_head) still come from and go back to
    the kernel, so the retained heap stays near the working set of one layer.

    Called by ``mergeengine run``; library users may call it too. Idempotent.

    Returns:
        True when the allocator was tuned.
    """
    global _DONE
    if _DONE:
        return True
    c = libc() if sys.platform.startswith("linux") else None
    if c is None:
        return False
    try:
        ok = c.mallopt(_M_MMAP_THRESHOLD, max_block_bytes) == 1
        ok = ok and c.mallopt(_M_TRIM_THRESHOLD, 2 * max_block_bytes) == 1
    except AttributeError:  # not glibc (musl, ...)
        return False
    _DONE = ok
    LOG.debug("allocator tuned to reuse freed blocks: %s", ok)
    return ok
