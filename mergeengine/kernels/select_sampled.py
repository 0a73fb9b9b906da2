"""Sampled selection: a sample of a tensor predicts where its order statistics lie.

On the CPU, a fixed sample of a tensor (:func:`sample_index`: runs of consecutive entries,
evenly spaced) gives, for each wanted rank of ``|x|``, a narrow window of magnitudes that very
likely holds it. One pass over the chunks then counts the entries above each window and keeps the
few inside it, and the rank is selected exactly among those (:class:`_Window`). A rank that falls
outside its window, a tensor too small for a sample (:func:`samples_help`) or a device other than
the CPU takes the two exact histogram passes of :mod:`mergeengine.kernels.select_exact`, so the
result is always exact and equal to theirs: a bad sample costs time, never bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from mergeengine.kernels.select_exact import (
    ABS_MASK,
    ChunkedTopk,
    RankSelection,
    in_range,
    select_abs_ranks_streamed_many,
)

#: Sampled selection (:func:`top_k_streamed`): the sample is this many runs of :data:`SAMPLE_RUN`
#: consecutive entries, evenly spaced over the tensor (runs keep the gather cache-friendly).
SAMPLE_RUNS = 1024
SAMPLE_RUN = 64
#: Tensors with fewer entries skip the sample and take the two exact histogram passes.
SAMPLED_MIN_NUMEL = 1 << 20
#: Half-width of the predicted window, in standard deviations of the sample quantile's rank.
SAMPLE_Z = 4.0
#: The window is not used when the sample puts more than this share of the entries in it (a
#: point mass: e.g. most deltas of a tensor are 0), and is given up during the pass once it has
#: collected twice this share.
SAMPLE_MAX_WINDOW = 0.1
_NO_BITS_ABOVE = 1 << 31  # above every bit pattern of a magnitude (the sign bit is clear)


def sample_index(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the sample used by :func:`top_k_streamed` for a tensor of ``numel`` entries.

    :data:`SAMPLE_RUNS` runs of :data:`SAMPLE_RUN` consecutive entries, evenly spaced (all
    entries when the tensor is smaller than that). The same positions for the same ``numel``.

    Returns:
        A 1-D int64 tensor of distinct positions in ``[0, numel)``, increasing, on ``device``.
    """
    return torch.from_numpy(_sample_positions(numel, SAMPLE_RUNS, SAMPLE_RUN)).to(device)


@functools.lru_cache(maxsize=64)
def _sample_positions(numel: int, runs: int, run: int) -> np.ndarray:
    if numel <= runs * run:
        return np.arange(numel, dtype=np.int64)
    starts = np.floor(np.linspace(0, numel - run, runs)).astype(np.int64)
    return (starts[:, None] + np.arange(run, dtype=np.int64)[None, :]).reshape(-1)


def samples_help(numel: int) -> bool:
    """Whether :func:`top_k_streamed` / :func:`select_abs_ranks_sampled` use a sample for tensors
    of ``numel`` entries (at least :data:`SAMPLED_MIN_NUMEL`): callers skip gathering one otherwise."""
    return numel >= SAMPLED_MIN_NUMEL


def sample_float32(x: torch.Tensor) -> np.ndarray:
    """The entries of a CPU tensor at :func:`sample_index` (of its size), as a float32 array.

    A plain numpy gather (no thread-pool split for 65536 entries); bfloat16 is widened exactly by
    shifting its bits (numpy has no bfloat16). On a memory-mapped input this is usually the first
    touch of the tensor's pages, which costs more than the gather itself (see docs/benchmarks.md).

    Raises:
        ValueError: for a tensor that is not on the CPU.
    """
    if x.device.type != "cpu":
        raise ValueError(f"sample_float32 needs a CPU tensor, got one on {x.device}")
    flat = x.detach().reshape(-1)
    at = _sample_positions(flat.numel(), SAMPLE_RUNS, SAMPLE_RUN)
    if flat.dtype == torch.bfloat16:
        high = flat.view(torch.int16).numpy()[at].astype(np.int32)
        return np.left_shift(high, 16).view(np.float32)
    if flat.dtype in (torch.float16, torch.float32):
        return flat.numpy()[at].astype(np.float32)
    return flat[torch.from_numpy(at)].float().numpy()


class _Window:
    """One rank of one chunked tensor, bracketed by a window of magnitudes that a sample predicts.

    The sample's quantile at the wanted rank, plus or minus :data:`SAMPLE_Z` standard deviations,
    gives a window ``[lo, hi)`` of bit patterns. One pass counts the entries above the window and
    keeps the (few) entries inside it; if the rank then falls inside, the exact order statistic
    is selected among the kept entries. Otherwise :meth:`finish` says so and the caller takes the
    exact histogram passes: a bad sample costs time, never exactness.

    Point masses matter: bf16 deltas take few distinct values, one of which can hold percents of a
    tensor. The window therefore leaves out the values at its edges (unless one is the predicted
    value itself), so its share of the entries stays near the sample's margin.
    """

    def __init__(self, sample: np.ndarray, numel: int, rank: int) -> None:
        self.numel, self.rank = numel, rank
        self.above, self.collected = 0, 0
        self.parts: list[np.ndarray] = []
        bits = np.bitwise_and(np.ascontiguousarray(sample, dtype=np.float32).reshape(-1).view(np.uint32), ABS_MASK)
        m = bits.size
        self.ok = m > 0
        if not self.ok:
            return
        r = (rank - 0.5) / numel
        half = SAMPLE_Z * math.sqrt(m * r * (1.0 - r)) + 8.0
        low, mid, high = math.floor(r * m - half), min(m - 1, int(r * m)), math.ceil(r * m + half)
        bits = np.partition(bits, sorted({min(max(j, 0), m - 1) for j in (low, mid, high)}))  # three order statistics
        centre = int(bits[mid])
        self.lo = 0 if low < 0 else (int(bits[low]) + 1 if int(bits[low]) < centre else centre)
        self.hi = _NO_BITS_ABOVE if high >= m else (int(bits[high]) if int(bits[high]) > centre else centre + 1)
        inside = int(np.count_nonzero((bits >= self.lo) & (bits < self.hi)))
        self.ok = inside <= SAMPLE_MAX_WINDOW * m
        self.limit = int(2 * SAMPLE_MAX_WINDOW * numel)

    def add(self, bits: np.ndarray, offset: np.ndarray, inside: np.ndarray) -> None:
        """Count and keep the next chunk's entries (``bits``: uint32 magnitude bit patterns;
        ``offset`` and ``inside``: uint32 and bool scratch of the same length)."""
        if not self.ok:
            return
        self.above += int(np.count_nonzero(np.greater_equal(bits, self.hi, out=inside)))
        part = in_range(bits, self.lo, self.hi - self.lo, offset, inside)
        self.parts.append(part)
        self.collected += part.size
        if self.collected > self.limit:  # far more than the sample said: give the window up
            self.ok, self.parts = False, []

    def finish(self) -> tuple[RankSelection, list[int]] | None:
        """The selection and, per chunk, how many entries equal it; None when the rank fell
        outside the window (or the window was given up)."""
        if not self.ok:
            return None
        below = self.numel - self.above - self.collected
        within = self.rank - below
        if not 1 <= within <= self.collected:
            return None
        kept = np.concatenate(self.parts)
        value = int(np.partition(kept, within - 1)[within - 1])
        selection = RankSelection(bits=self.lo + value, count_less=below + int(np.count_nonzero(kept < value)),
                                  count_equal=int(np.count_nonzero(kept == value)))
        return selection, [int(np.count_nonzero(part == value)) for part in self.parts]


def top_k_streamed(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]], numel: int, ks: Sequence[int],
    samples: Sequence[np.ndarray] | None = None, *, magnitudes: bool = False,
) -> list[ChunkedTopk]:
    """The top-``ks[i]`` of each of several chunked tensors of one size (e.g. the deltas of a
    merge's inputs over one slice of the base at a time), as :class:`ChunkedTopk` choosers.

    Without ``samples`` this is :func:`select_abs_ranks_streamed_many`: two passes over the chunks
    (a histogram of the high bits, then the low bits of one bin). With ``samples`` (the tensors'
    entries at :func:`sample_index` as float32 arrays, see :func:`sample_float32`; CPU chunks only;
    tensors of at least :data:`SAMPLED_MIN_NUMEL` entries), a window around each sample's quantile
    usually settles the selection in one pass that costs about half of the two (compares and a
    compaction of ~1% of the entries instead of a 32768-bin histogram), and it also counts the
    threshold's ties in each chunk, so :meth:`ChunkedTopk.trim_` never searches for them. A tensor
    whose rank falls outside its window takes the two exact passes. The results are exact either
    way: the same choosers as the exact passes give on each tensor.

    Args:
        chunks: returns an iterable of per-position groups, one contiguous float32 chunk per
            tensor; called once or three times, with the same chunks in the same order.
        numel: entries of each tensor.
        ks: how many entries to keep of each tensor, ``0 <= k <= numel``.
        samples: each tensor's entries at ``sample_index(numel)``, or None.
        magnitudes: the chunks hold ``|x|`` already (e.g. a torch ``abs_`` where the chunk is made,
            ~4x cheaper than numpy's sign-bit mask here): the window pass reads their bits as they are.

    Returns:
        One :class:`ChunkedTopk` per tensor; call its ``trim_`` once per chunk, in order, over the
        same chunk boundaries.
    """
    ranks = [[numel - k + 1] if 0 < k < numel else [] for k in ks]
    found = _select_sampled(chunks, numel, ranks, samples, magnitudes)
    return [ChunkedTopk(None, k, numel=numel, selection=found[i][0][0] if ranks[i] else None,
                        tie_counts=found[i][0][1] if ranks[i] else None) for i, k in enumerate(ks)]


def select_abs_ranks_sampled(
    chunks: Callable[[], Iterable[torch.Tensor]], numel: int, ks: Sequence[int], sample: np.ndarray | None
) -> list[RankSelection]:
    """Several ranks of one chunked tensor (see :func:`~mergeengine.kernels.select_exact.select_abs_ranks_streamed_many`), each usually
    settled in one pass by a window that ``sample`` (its entries at :func:`sample_index`)
    predicts; see :func:`top_k_streamed`. Exact either way.
    """
    found = _select_sampled(lambda: ((c,) for c in chunks()), numel, [ks],
                            None if sample is None else [sample])
    return [selection for selection, _ in found[0]]


def _select_sampled(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]], numel: int, ks: Sequence[Sequence[int]],
    samples: Sequence[np.ndarray] | None, magnitudes: bool = False,
) -> list[list[tuple[RankSelection, list[int] | None]]]:
    """``ks[i]``: ranks (1-based, from the smallest) wanted of tensor ``i``. Per tensor and rank:
    the selection and, when a window settled it, its ties per chunk."""
    for k in (k for group in ks for k in group):
        if isinstance(k, bool) or not 1 <= k <= numel:
            raise ValueError(f"k={k} out of range for {numel} elements")
    windows: dict[tuple[int, int], _Window] = {}
    if samples is not None and samples_help(numel):
        for i, group in enumerate(ks):
            for j, k in enumerate(group):
                window = _Window(samples[i], numel, k)
                if window.ok:
                    windows[(i, j)] = window
    found = _window_pass(chunks, windows, magnitudes) if windows else {}
    missing = [[k for j, k in enumerate(group) if (i, j) not in found] for i, group in enumerate(ks)]
    if any(missing):
        picked = select_abs_ranks_streamed_many(chunks, numel, missing)
        for i, group in enumerate(ks):
            exact = iter(picked[i])
            for j in range(len(group)):
                if (i, j) not in found:
                    found[(i, j)] = (next(exact), None)
    return [[found[(i, j)] for j in range(len(group))] for i, group in enumerate(ks)]


def _window_pass(chunks: Callable[[], Iterable[Sequence[torch.Tensor]]], windows: dict[tuple[int, int], _Window],
                 magnitudes: bool) -> dict[tuple[int, int], tuple[RankSelection, list[int] | None]]:
    """One pass over the chunks feeding every predicted window; the windows that settled their rank.

    numpy throughout: on the CPU its single-threaded ops beat torch's here (~10%).
    """
    by_stream: dict[int, list[_Window]] = {}
    for (i, _), window in windows.items():
        by_stream.setdefault(i, []).append(window)
    scratch = np.empty(0, dtype=np.uint32)
    inside = np.empty(0, dtype=bool)
    for group in chunks():
        n = group[0].numel()
        if scratch.size < 2 * n:
            scratch, inside = np.empty(2 * n, dtype=np.uint32), np.empty(n, dtype=bool)
        bits, offset = scratch[:n], scratch[n:2 * n]
        for i, stream_windows in by_stream.items():
            raw = group[i].reshape(-1).numpy().view(np.uint32)
            mags = raw if magnitudes else np.bitwise_and(raw, ABS_MASK, out=bits)
            for window in stream_windows:
                window.add(mags, offset, inside[:n])
    return {key: result for key, window in windows.items() if (result := window.finish()) is not None}

