"""Exact order statistics of magnitudes, fast on large tensors.

Every function here ranks entries by the IEEE-754 bit pattern of ``|x|`` read as a non-negative
int32. For non-negative floats that order is the numeric order, so the results are exact (never
approximate) and agree with ``torch.sort(x.abs())``; it also fixes the corner cases once:

* ``-0.0`` and ``+0.0`` have the same magnitude (both are bit pattern 0) and tie;
* subnormals rank between 0 and the smallest normal number, as they should;
* NaN ranks above ``+inf`` (as in ``torch.sort``). Deltas with NaN are an error upstream; this
  module only guarantees that they do not make selection crash or go out of range.

Large tensors (more than :data:`HISTOGRAM_MIN_NUMEL` entries) use a two-pass radix select instead
of a sort: pass 1 histograms the high 16 bits of every bit pattern (65536 bins), a cumulative sum
finds the bin that holds the wanted rank, pass 2 histograms the low 16 bits of the few entries in
that bin. Both passes are linear and need no comparison sort. On a 5632x2048 float32 tensor, one
CPU thread: ~40 ms, against ~160-260 ms for ``torch.kthvalue`` and ~1.1 s for the ``argsort``
mergekit uses (``python -m benchmarks.kernels_selection`` prints the figures). Extra memory is
~3 bytes per entry (int16 keys and a bool mask), less than ``kthvalue``'s copies. The same two
histograms, summed over tensors, give a model-wide quantile: see :mod:`mergeengine.kernels.quantile`.

Rounding of "a fraction of the entries" to a count is done in one place, :func:`keep_count`.

A sample of the tensor can settle a selection in one pass instead of two: see
:mod:`mergeengine.kernels.select_sampled`, which falls back on the passes here.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mergeengine.kernels.chunking import spans

#: Tensors with at most this many entries are ranked with ``torch.kthvalue`` on the bit patterns:
#: below this size the 65536-bin histograms cost more than they save. Results are identical.
HISTOGRAM_MIN_NUMEL = 1 << 16

#: Number of bins of each histogram (16 bits of the float32 bit pattern).
HISTOGRAM_BINS = 1 << 16
#: Bins of a histogram of the high 16 bits of magnitudes (the sign bit is clear: 15 bits).
HIGH_BINS = 1 << 15

# Entries per chunk for chunked elementwise passes on CPU: 256 KiB of float32, cache-resident.
_CHUNK_NUMEL = 1 << 16
#: Clears the sign bit: ``bits & ABS_MASK`` is the bit pattern of ``|x|``.
ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000  # bit pattern of +inf; larger patterns are NaN
# Position of the high 16-bit half of each float32 when viewed as int16 pairs.
_HIGH_HALF = 1 if sys.byteorder == "little" else 0


KeepCount = Literal["round", "truncate"]


def keep_count(numel: int, fraction: float, rounding: KeepCount = "round") -> int:
    """How many of ``numel`` entries a keep fraction means: ``floor(fraction * numel + 0.5)``.

    ``rounding="truncate"`` gives mergekit's count instead, ``int(fraction * numel)``.

    Round half up, not ``int()``: ``int(0.29 * 100)`` is 28 because ``0.29 * 100`` is
    28.999999999999996 in floating point. Rounding to nearest also keeps the realised fraction
    within ``0.5 / numel`` of the requested one.

    Args:
        numel: number of entries, >= 0.
        fraction: keep fraction in [0, 1].
        rounding: ``round`` (to nearest, half up) or ``truncate`` (toward zero, mergekit's).

    Returns:
        An int in ``[0, numel]``.

    Raises:
        ValueError: when ``fraction`` is not a finite number in [0, 1] or ``numel`` < 0.
    """
    check_fraction(fraction, "density")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if rounding == "truncate":
        return min(numel, int(fraction * numel))
    return min(numel, math.floor(fraction * numel + 0.5))


def check_fraction(value: float, name: str) -> float:
    """Validate a fraction parameter (density, gamma).

    Args:
        value: the value to check.
        name: parameter name used in the error message.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: when ``value`` is not a finite real number in [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def abs_high_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of the bit patterns of ``|x|``: pass 1 of the radix select.

    Bin ``b`` counts the entries whose magnitude lies in
    ``[bits_to_float(b << 16), bits_to_float((b + 1) << 16))``. The sign bit of ``|x|`` is 0, so
    bins 32768 and above are always empty; 65536 bins keep the layout "one bin per 16-bit
    pattern". Histograms of different tensors add up to the histogram of their concatenation.

    Args:
        x: any float tensor.

    Returns:
        An int64 tensor of :data:`HISTOGRAM_BINS` counts on ``x``'s device.
    """
    return torch.bincount(high_keys(_flat_float32(x)), minlength=HISTOGRAM_BINS)


def abs_low_histogram(x: torch.Tensor, high_bin: int) -> torch.Tensor:
    """Counts of the low 16 bits of ``|x|``'s bit patterns, over entries in ``high_bin`` only.

    Pass 2 of the radix select. Bin ``j`` counts the entries whose magnitude has bit pattern
    exactly ``(high_bin << 16) | j``, so this histogram resolves ties exactly.

    Args:
        x: any float tensor.
        high_bin: a bin of :func:`abs_high_histogram`, in ``[0, 65535]``.

    Returns:
        An int64 tensor of :data:`HISTOGRAM_BINS` counts on ``x``'s device.
    """
    flat = _flat_float32(x)
    candidates = flat.view(torch.int32)[high_keys(flat) == high_bin]
    return torch.bincount(candidates & 0xFFFF, minlength=HISTOGRAM_BINS)


def locate_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """Find the bin that holds the entry of a given 1-based rank (counting from the smallest).

    Args:
        histogram: 1-D integer counts, bins in increasing order of value.
        rank: 1-based rank, ``1 <= rank <= histogram.sum()``.

    Returns:
        ``(bin, count_below, count_in_bin)``: the bin index, the number of entries in lower bins,
        and the number of entries in that bin. The rank within the bin is ``rank - count_below``.

    Raises:
        ValueError: when ``rank`` is out of range.
    """
    # numpy on the CPU: a 65536-bin cumsum is too small to be worth torch's thread pool.
    cumulative = np.cumsum(histogram.detach().to("cpu", torch.int64).numpy())
    total = int(cumulative[-1]) if cumulative.size else 0
    if isinstance(rank, bool) or not 1 <= rank <= total:
        raise ValueError(f"rank {rank} out of range for {total} counted entries")
    bin_index = int(np.searchsorted(cumulative, rank, side="left"))  # first bin reaching the rank
    count_below = int(cumulative[bin_index - 1]) if bin_index > 0 else 0
    return bin_index, count_below, int(cumulative[bin_index]) - count_below


def bits_to_float(bits: int) -> float:
    """The float32 value with a given bit pattern (as a Python float, exact).

    Args:
        bits: a 32-bit pattern, ``0 <= bits < 2**32``.

    Returns:
        The float32 value, widened exactly to a Python float.
    """
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def float_to_bits(value: float) -> int:
    """The bit pattern of ``value`` rounded to float32 (the inverse of :func:`bits_to_float`).

    Args:
        value: a Python float.

    Returns:
        An int in ``[0, 2**32)``.
    """
    return struct.unpack("<I", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class RankSelection:
    """Where an order statistic of ``|x|`` sits among the entries of ``x``.

    Attributes:
        bits: bit pattern of the selected magnitude (non-negative int32 value).
        count_less: entries whose magnitude is strictly smaller.
        count_equal: entries whose magnitude is equal (including the selected one).
    """

    bits: int
    count_less: int
    count_equal: int

    @property
    def value(self) -> float:
        """The selected magnitude as a Python float (exact)."""
        return bits_to_float(self.bits)


def select_abs_rank(x: torch.Tensor, k: int) -> RankSelection:
    """The k-th smallest magnitude of ``x`` (1-based) with its tie counts, exactly.

    Args:
        x: any float tensor.
        k: rank from the smallest, ``1 <= k <= x.numel()``.

    Returns:
        A :class:`RankSelection`.

    Raises:
        ValueError: when ``k`` is out of range.
    """
    flat = _flat_float32(x)
    numel = flat.numel()
    if isinstance(k, bool) or not 1 <= k <= numel:
        raise ValueError(f"k={k} out of range for {numel} elements")
    if numel <= HISTOGRAM_MIN_NUMEL:
        bits = flat.view(torch.int32) & ABS_MASK
        selected = int(torch.kthvalue(bits, k).values)
        return RankSelection(
            bits=selected,
            count_less=int((bits < selected).sum()),
            count_equal=int((bits == selected).sum()),
        )
    keys = high_keys(flat)
    high_bin, below_high, _ = locate_rank(torch.bincount(keys, minlength=HISTOGRAM_BINS), k)
    candidates = flat.view(torch.int32)[keys == high_bin]
    low_histogram = torch.bincount(candidates & 0xFFFF, minlength=HISTOGRAM_BINS)
    low_bin, below_low, equal = locate_rank(low_histogram, k - below_high)
    return RankSelection(
        bits=(high_bin << 16) | low_bin, count_less=below_high + below_low, count_equal=equal
    )


def select_abs_ranks_streamed_many(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]], numel: int, ks: Sequence[Sequence[int]],
) -> list[list[RankSelection]]:
    """Ranks of several tensors of one size that are never materialised: they arrive as chunks.

    ``chunks()`` yields, per position, one contiguous 1-D float32 chunk of every tensor (e.g. the
    deltas of all the inputs of a merge over one slice of the base, so the base slice is converted
    once), in the same order each time it is called; it is called twice (the two histogram
    passes). Each chunk is used before the next is requested, so they may all be views of one
    scratch buffer: a merge so selects on ``model - base`` computed chunk by chunk in cache-sized
    scratch, instead of building a float32 copy of the whole delta. The high-bits histogram is
    shared by every rank of a tensor; pass 2 histograms the low bits of each distinct high bin
    the ranks fall in. ``ks[i]`` are the ranks (1-based, from the smallest) wanted from tensor
    ``i``. Results equal :func:`select_abs_rank` on each tensor (the concatenation of its chunks).

    Raises:
        ValueError: when a rank is out of range.
    """
    for k in (k for group in ks for k in group):
        if isinstance(k, bool) or not 1 <= k <= numel:
            raise ValueError(f"k={k} out of range for {numel} elements")
    streams = range(len(ks))
    if numel <= HISTOGRAM_MIN_NUMEL:
        parts: list[list[torch.Tensor]] = [[] for _ in streams]
        for group in chunks():
            for i in streams:
                parts[i].append(group[i].reshape(-1).clone())  # chunks may share a buffer
        return [[select_abs_rank(torch.cat(parts[i]), k) for k in ks[i]] for i in streams]
    high = _high_histograms(chunks, ks)
    located = [[locate_rank(high[i], k) for k in ks[i]] for i in streams]
    lows = _low_histograms(chunks, [sorted({b for b, _, _ in located[i]}) for i in streams])
    out: list[list[RankSelection]] = []
    for i in streams:
        picked = []
        for k, (high_bin, below_high, _) in zip(ks[i], located[i], strict=True):
            low_bin, below_low, equal = locate_rank(lows[i][high_bin], k - below_high)
            picked.append(RankSelection(bits=(high_bin << 16) | low_bin, count_less=below_high + below_low,
                                        count_equal=equal))
        out.append(picked)
    return out


def _high_histograms(chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
                     ks: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Pass 1: each stream's histogram of the high 16 bits of ``|x|`` (a clear sign bit: < 2**15)."""
    high: list[torch.Tensor | None] = [None for _ in ks]
    for group in chunks():
        for i, wanted in enumerate(ks):
            if wanted:
                counts = torch.bincount(high_keys(group[i]), minlength=HIGH_BINS)
                high[i] = counts if high[i] is None else high[i].add_(counts)  # type: ignore[union-attr]
    return high  # type: ignore[return-value]


def _low_histograms(chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
                    bins: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """Pass 2: per stream, the low-16-bit histogram of each high bin a wanted rank falls in."""
    collected = [_LowBits() for _ in bins]
    if any(bins):
        for group in chunks():
            for i, wanted in enumerate(bins):
                if wanted:
                    collected[i].add(group[i], wanted)
    return [{b: collected[i].histogram(b) for b in wanted} for i, wanted in enumerate(bins)]



def in_range(bits: np.ndarray, lo: int, width: int, offset: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``bits - lo`` (uint32) of the entries of ``bits`` (uint32) in ``[lo, lo + width)``, a new
    array; ``offset`` and ``inside`` are uint32 and bool scratch of ``bits``' length. Entries below
    ``lo`` wrap above ``width``, so one compare finds them all: numpy's compare and
    ``flatnonzero`` take ~0.3 ns per entry, torch's bool compare and gather ~1.2."""
    np.subtract(bits, lo, out=offset)
    return offset[np.flatnonzero(np.less(offset, width, out=inside))]



def kth_smallest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value of ``|x|`` (1-based), exactly.

    Same value as ``torch.kthvalue(x.abs().flatten().float(), k).values``; ``-0.0`` counts as 0.

    Args:
        x: any float tensor.
        k: rank, 1 <= k <= x.numel().

    Returns:
        A 0-d float32 tensor on ``x``'s device.

    Raises:
        ValueError: when ``k`` is out of range.

    Example:
        >>> kth_smallest_abs(torch.tensor([-3.0, 1.0, 2.0]), 2)
        tensor(2.)
    """
    selected = select_abs_rank(x, k)
    return torch.tensor(selected.bits, dtype=torch.int32, device=x.device).view(torch.float32)


def topk_abs_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the ``k`` entries of largest magnitude.

    Tie rule: entries are ranked by magnitude, descending, and among equal magnitudes by flat
    (row-major) index, ascending; the first ``k`` in that total order are kept. So exactly ``k``
    entries are True even when many magnitudes tie at the threshold (zeros, bf16-quantised
    deltas), the result is deterministic, and masks for ``k1 < k2`` are nested.

    Args:
        x: any float tensor.
        k: number of entries to keep, ``0 <= k <= x.numel()``.

    Returns:
        A bool tensor of ``x``'s shape, on ``x``'s device, with exactly ``k`` True entries.

    Raises:
        ValueError: when ``k`` is out of range.

    Example:
        >>> topk_abs_mask(torch.tensor([1.0, -3.0, 3.0, 0.5]), 2)
        tensor([False,  True,  True, False])
        >>> topk_abs_mask(torch.tensor([2.0, 1.0, -2.0, 2.0]), 2)  # tie at 2: lowest indices win
        tensor([ True, False,  True, False])
    """
    numel = x.numel()
    if isinstance(k, bool) or not 0 <= k <= numel:
        raise ValueError(f"k={k} out of range for {numel} elements")
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k == numel:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    flat = _flat_float32(x)
    selected = select_abs_rank(flat, numel - k + 1)  # the k-th largest
    count_greater = numel - selected.count_less - selected.count_equal
    needed_ties = k - count_greater  # 1 <= needed_ties <= count_equal
    if needed_ties == selected.count_equal:
        return _compare_magnitude_bits(flat, selected.bits, torch.ge).view(x.shape)
    mask = _compare_magnitude_bits(flat, selected.bits, torch.gt)
    # Ties at the threshold: keep the first ones in flat order, stopping once enough are found.
    step = _chunk_numel(flat)
    bits_chunk = torch.empty(min(numel, step), dtype=torch.int32, device=flat.device)
    for start, end in spans(numel, step):
        chunk = bits_chunk[: end - start]
        torch.bitwise_and(flat.view(torch.int32)[start:end], ABS_MASK, out=chunk)
        tie_index = torch.nonzero(chunk == selected.bits).view(-1)[:needed_ties]
        mask[start:end][tie_index] = True
        needed_ties -= tie_index.numel()
        if needed_ties == 0:
            break
    return mask.view(x.shape)


def _compare_magnitude_bits(
    flat: torch.Tensor, bits: int, compare: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``compare(bit pattern of |flat|, bits)`` as a new bool tensor, computed chunk by chunk.

    Chunks small enough to stay in cache, written into one preallocated output, run ~2-3x faster
    than the same two ops on the whole tensor (no large temporaries to fault in).
    """
    numel = flat.numel()
    out = torch.empty(numel, dtype=torch.bool, device=flat.device)
    step = _chunk_numel(flat)
    bits_chunk = torch.empty(min(numel, step), dtype=torch.int32, device=flat.device)
    for start, end in spans(numel, step):
        chunk = bits_chunk[: end - start]
        torch.bitwise_and(flat.view(torch.int32)[start:end], ABS_MASK, out=chunk)
        compare(chunk, bits, out=out[start:end])
    return out


def _chunk_numel(flat: torch.Tensor) -> int:
    """Chunk length for the mask passes: cache-sized on CPU, one chunk on accelerators.

    Half of :data:`~mergeengine.kernels.chunking.CHUNK_NUMEL`: 256 KiB of float32 input plus its
    int32 bit patterns stay in cache; these passes sum nothing, so no block alignment is needed.
    """
    return _CHUNK_NUMEL if flat.device.type == "cpu" else max(1, flat.numel())


def _flat_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D float32 tensor (a view when it already is one)."""
    return x.detach().to(torch.float32).contiguous().view(-1)


def high_keys(flat: torch.Tensor) -> torch.Tensor:
    """High 16 bits of the bit patterns of ``|flat|`` (a contiguous 1-D float32 tensor), as int16
    values in ``[0, HIGH_BINS)``: the keys of pass 1 of every radix select here.

    Reading the high halves through an int16 view and clearing the sign bit does one strided copy
    and one in-place op at half the width, instead of abs, shift and a 4-byte key array.
    """
    keys = flat.view(torch.int16)[_HIGH_HALF::2].clone(memory_format=torch.contiguous_format)
    return keys.bitwise_and_(0x7FFF)


class _LowBits:
    """Pass 2 of the streamed radix select: the low 16 bits of the entries in one high bin.

    A histogram over every entry of a chunk would send the >99% outside the bin to the same
    counter (a serial dependency, ~1.5 ns per entry here); a boolean torch compare and gather cost
    ~1.2 ns. On the CPU, numpy's vectorised compare and ``flatnonzero`` find the few entries of the
    bin at ~0.3 ns per entry; their low bits are kept (a fraction of a percent of the entries) and
    histogrammed once at the end. Other devices use torch's compare and gather.
    """

    #: Collected entries per bin beyond which they are folded into a histogram (bounds memory
    #: when a bin holds most entries, e.g. the zeros of an unchanged tensor).
    FOLD_AT = 1 << 20

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint32)
        self._inside = np.empty(0, dtype=bool)
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._counts: dict[int, torch.Tensor] = {}
        self._pending: dict[int, int] = {}

    def add(self, chunk: torch.Tensor, high_bins: Sequence[int]) -> None:
        """Collect the low bits of the entries of ``chunk`` whose high 16 bits are in ``high_bins``."""
        flat = chunk.reshape(-1).view(torch.int32)
        if flat.device.type == "cpu":
            n = flat.numel()
            if self._buffer.size < 2 * n:
                self._buffer, self._inside = np.empty(2 * n, dtype=np.uint32), np.empty(n, dtype=bool)
            bits, offset, inside = self._buffer[:n], self._buffer[n:2 * n], self._inside[:n]
            np.bitwise_and(flat.numpy().view(np.uint32), ABS_MASK, out=bits)

            def low_bits(high_bin: int) -> torch.Tensor:  # the bin's entries: low 16 bits
                return torch.from_numpy(in_range(bits, high_bin << 16, HISTOGRAM_BINS, offset, inside).view(np.int32))
        else:
            keys = high_keys(chunk.reshape(-1))

            def low_bits(high_bin: int) -> torch.Tensor:
                return flat[keys == high_bin] & 0xFFFF
        for high_bin in high_bins:
            found = low_bits(high_bin)
            self._parts.setdefault(high_bin, []).append(found)
            self._pending[high_bin] = self._pending.get(high_bin, 0) + found.numel()
            if self._pending[high_bin] > self.FOLD_AT:
                self.histogram(high_bin)

    def histogram(self, high_bin: int) -> torch.Tensor:
        """Counts of the low 16 bits collected for ``high_bin`` (int64, CPU)."""
        counts = self._counts.setdefault(high_bin, torch.zeros(HISTOGRAM_BINS, dtype=torch.int64))
        found = [p.to("cpu") for p in self._parts.pop(high_bin, [])]
        self._pending[high_bin] = 0
        if found:
            counts.add_(torch.bincount(torch.cat(found), minlength=HISTOGRAM_BINS))
        return counts


class ChunkedTopk:
    """:func:`topk_abs_mask` of a flat tensor, delivered chunk by chunk.

    The k-th largest magnitude is selected once on the whole tensor; :meth:`mask` then gives the
    mask of consecutive chunks (requested in increasing order) with the same tie rule (the first
    tied entries in flat order are kept). Elementwise work after the selection can so run on
    cache-sized chunks, with chunk-sized temporaries.

    Args:
        flat: a contiguous 1-D float32 tensor (or None with ``numel`` and ``selection``).
        k: number of entries to keep, ``0 <= k <= numel``.
        numel: the tensor's size when ``flat`` is None.
        selection: the ``(numel - k + 1)``-th smallest magnitude, when already selected.
        tie_counts: with ``selection``, how many entries equal it in each successive chunk
            (see :func:`~mergeengine.kernels.select_sampled.top_k_streamed`): :meth:`trim_` then keeps or drops a chunk's ties
            with one fused op instead of searching for them. Only for :meth:`trim_`.
    """

    def __init__(self, flat: torch.Tensor | None, k: int, *, numel: int | None = None,
                 selection: RankSelection | None = None, tie_counts: Sequence[int] | None = None) -> None:
        self._tie_counts = None if tie_counts is None else iter(tie_counts)
        numel = flat.numel() if flat is not None else numel
        if numel is None or not 0 <= k <= numel:
            raise ValueError(f"k={k} out of range for {numel} elements")
        self.keep_all = k == numel
        self.keep_none = k == 0
        self.bits = 0
        self.ties_left = 0
        self.all_ties = True
        if not (self.keep_all or self.keep_none):
            if selection is None:
                if flat is None:
                    raise ValueError("ChunkedTopk needs the tensor or a precomputed selection")
                selection = select_abs_rank(flat, numel - k + 1)
            count_greater = numel - selection.count_less - selection.count_equal
            self.bits = selection.bits
            self.ties_left = k - count_greater
            self.all_ties = self.ties_left == selection.count_equal

    def trim_(self, chunk: torch.Tensor, bits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Zero the entries of the next chunk that are not kept, in place; returns ``chunk``.

        Same result as ``chunk.masked_fill_(~self.mask(chunk), 0)``, written into the caller's
        scratch (``bits``: int32, ``drop``: bool, both of the chunk's length) instead of new tensors.
        """
        if self.keep_all:
            return chunk
        if self.keep_none:
            return chunk.zero_()
        keep_ties = self.all_ties  # keep every entry equal to the threshold in this chunk
        if not keep_ties and self.ties_left > 0 and self._tie_counts is not None:
            here = next(self._tie_counts, None)
            if here is None:
                raise ValueError("ChunkedTopk.trim_ called for more chunks than tie_counts has")
            if here <= self.ties_left:  # all of this chunk's ties are among the first ones
                self.ties_left -= here
                keep_ties = True
        if keep_ties or self.ties_left == 0:
            if keep_ties and self.bits == 0:  # keep |x| >= 0: everything
                return chunk
            if self.bits <= _INF_BITS:  # one fused op: |x| > lambd kept (NaN too), the rest set to +0.0
                # keep |x| >= t is keep |x| > (the float just below t): no float lies in between
                lambd = bits_to_float(self.bits - 1 if keep_ties else self.bits)
                return torch.hardshrink(chunk, lambd, out=chunk)
            torch.bitwise_and(chunk.view(torch.int32), ABS_MASK, out=bits)
            compare = torch.lt if keep_ties else torch.le
            return chunk.masked_fill_(compare(bits, self.bits, out=drop), 0.0)
        if chunk.device.type == "cpu" and self.bits <= _INF_BITS:
            # Some ties still to keep: find them with numpy (compare + flatnonzero, ~0.3 ns per
            # entry against ~3 for torch's bool compares and nonzero), keep the first ones'
            # values, drop everything up to the threshold, and put those values back.
            torch.bitwise_and(chunk.view(torch.int32), ABS_MASK, out=bits)
            ties = np.flatnonzero(bits.numpy() == self.bits)[: self.ties_left]
            index = torch.from_numpy(ties)
            kept = chunk[index]
            torch.hardshrink(chunk, bits_to_float(self.bits), out=chunk)
            chunk[index] = kept
            self.ties_left -= len(ties)
            return chunk
        return chunk.masked_fill_(self.mask(chunk).logical_not_(), 0.0)

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """Bool mask of the next chunk (a contiguous float32 slice of the tensor, in order)."""
        if self.keep_all:
            return torch.ones(chunk.shape, dtype=torch.bool, device=chunk.device)
        if self.keep_none:
            return torch.zeros(chunk.shape, dtype=torch.bool, device=chunk.device)
        bits = chunk.view(torch.int32) & ABS_MASK
        if self.all_ties:
            return bits >= self.bits
        keep = bits > self.bits
        if self.ties_left > 0:
            tie_index = torch.nonzero(bits == self.bits).view(-1)[: self.ties_left]
            keep[tie_index] = True
            self.ties_left -= tie_index.numel()
        return keep
