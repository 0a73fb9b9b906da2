"""Exact model-wide magnitude quantile, streamed one tensor at a time (map/reduce).

TIES with ``trim_scope: model`` keeps the top ``density`` fraction of magnitudes over *all* tensors
of a model. That threshold is an order statistic of a vector nobody may hold in memory, so it is
computed as an exact two-pass radix select over the float32 bit patterns of ``|x|`` (monotone in
the value, see :mod:`mergeengine.kernels.select_exact`):

1. **Stage 1** (map over tensors): :meth:`MagnitudeQuantile.stage1_partial` histograms the high 16
   bits of every bit pattern (65536 int64 bins). Partials add. :meth:`~MagnitudeQuantile.stage1_reduce`
   takes the summed histogram and finds the bin holding the target rank.
2. **Stage 2** (map over tensors again): :meth:`~MagnitudeQuantile.stage2_partial` histograms the
   low 16 bits of the entries in that bin only. Partials add.
   :meth:`~MagnitudeQuantile.stage2_reduce` finds the exact bit pattern, hence the exact value.

Each partial is 512 KiB whatever the tensor size, partials can be computed in any order or in
parallel, and the result equals ``torch.kthvalue`` on the concatenation of all tensors.

Which rank: with ``N`` entries in total and ``k = floor(density * N + 0.5)`` (the same rounding as
:func:`~mergeengine.kernels.select_exact.keep_count`), the threshold is the **k-th largest magnitude**,
i.e. the ``(N - k + 1)``-th smallest. Keeping ``|x| >= threshold`` (see
:func:`mergeengine.kernels.sparsify.threshold_prune`) keeps exactly ``k`` entries when no other
magnitude ties with the threshold, and every tied entry otherwise (more than ``k``). When
``k == 0`` (density 0, or no entries) the threshold is ``+inf``, which keeps nothing.

Example::

    quantile = MagnitudeQuantile(density=0.2)
    counts = sum(quantile.stage1_partial(delta(name)) for name in names)
    state = quantile.stage1_reduce(counts)
    counts = sum(quantile.stage2_partial(delta(name), state) for name in names)
    threshold = quantile.stage2_reduce(counts, state)
    trimmed = threshold_prune(delta(name), threshold)  # per tensor, in the merge pass
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mergeengine.kernels.select_exact import (
    HISTOGRAM_BINS,
    abs_high_histogram,
    abs_low_histogram,
    bits_to_float,
    check_fraction,
    keep_count,
    locate_rank,
)


@dataclass(frozen=True)
class QuantileState:
    """Result of stage 1: where the threshold lies. Plain ints, cheap to pickle or log.

    Attributes:
        total_numel: ``N``, the number of entries over all tensors.
        keep_count: ``k = floor(density * N + 0.5)``.
        rank: 1-based rank of the threshold counted from the smallest, ``N - k + 1``; 0 when
            ``k == 0`` (no threshold: keep nothing).
        high_bin: bin of the high 16 bits holding that rank; -1 when ``k == 0``.
        rank_in_bin: 1-based rank of the threshold among the entries of ``high_bin``.
    """

    total_numel: int
    keep_count: int
    rank: int
    high_bin: int
    rank_in_bin: int

    @property
    def keeps_nothing(self) -> bool:
        """True when ``k == 0``: stage 2 has nothing to find and the threshold is +inf."""
        return self.keep_count == 0


class MagnitudeQuantile:
    """Exact k-th largest ``|x|`` over many tensors, computed as two map/reduce passes.

    Args:
        density: keep fraction in [0, 1]; the threshold is the k-th largest magnitude with
            ``k = floor(density * N + 0.5)`` over all ``N`` entries.

    Raises:
        ValueError: when ``density`` is not in [0, 1].
    """

    #: Length of every partial histogram.
    BINS = HISTOGRAM_BINS

    def __init__(self, density: float) -> None:
        self.density = check_fraction(density, "density")

    def stage1_partial(self, tensor: torch.Tensor) -> torch.Tensor:
        """Histogram of the high 16 bits of ``|tensor|``'s float32 bit patterns.

        Args:
            tensor: one tensor of the model (any float dtype, any shape, any device).

        Returns:
            An int64 tensor of 65536 counts on ``tensor``'s device; sum the partials of all
            tensors (on any one device) before :meth:`stage1_reduce`.
        """
        return abs_high_histogram(tensor)

    def stage1_reduce(self, partials_sum: torch.Tensor, total_numel: int | None = None) -> QuantileState:
        """Locate the high-16-bit bin that holds the threshold.

        Args:
            partials_sum: the sum of every tensor's :meth:`stage1_partial`.
            total_numel: the number of entries over all tensors, if known; checked against the
                histogram's total to catch a tensor that was missed or counted twice.

        Returns:
            A :class:`QuantileState` for stage 2.

        Raises:
            ValueError: on a histogram of the wrong length or a ``total_numel`` mismatch.
        """
        histogram = _check_histogram(partials_sum)
        counted = int(histogram.sum())
        if total_numel is not None and total_numel != counted:
            raise ValueError(
                f"stage 1 histograms count {counted} entries but total_numel is {total_numel}: "
                "a tensor was missed or counted twice"
            )
        k = keep_count(counted, self.density)
        if k == 0:
            return QuantileState(total_numel=counted, keep_count=0, rank=0, high_bin=-1, rank_in_bin=0)
        rank = counted - k + 1
        high_bin, count_below, _ = locate_rank(histogram, rank)
        return QuantileState(
            total_numel=counted,
            keep_count=k,
            rank=rank,
            high_bin=high_bin,
            rank_in_bin=rank - count_below,
        )

    def stage2_partial(self, tensor: torch.Tensor, state: QuantileState) -> torch.Tensor:
        """Histogram of the low 16 bits of ``|tensor|``'s entries that fall in ``state.high_bin``.

        Args:
            tensor: one tensor of the model, the same data as in stage 1.
            state: the result of :meth:`stage1_reduce`.

        Returns:
            An int64 tensor of 65536 counts on ``tensor``'s device (all zero when the state keeps
            nothing); sum the partials of all tensors before :meth:`stage2_reduce`.
        """
        if state.keeps_nothing:
            return torch.zeros(self.BINS, dtype=torch.int64, device=tensor.device)
        return abs_low_histogram(tensor, state.high_bin)

    def stage2_reduce(self, partials_sum: torch.Tensor, state: QuantileState) -> float:
        """The exact threshold: the k-th largest magnitude over all tensors.

        Args:
            partials_sum: the sum of every tensor's :meth:`stage2_partial`.
            state: the result of :meth:`stage1_reduce`.

        Returns:
            The threshold as a Python float (a float32 value, exactly); ``math.inf`` when
            ``k == 0``. NaN magnitudes rank above ``+inf``, so it is NaN only when more than
            ``N - k`` entries are NaN.

        Raises:
            ValueError: when the histogram does not match the state (wrong data in stage 2).
        """
        if state.keeps_nothing:
            return math.inf
        histogram = _check_histogram(partials_sum)
        low_bin, _, _ = locate_rank(histogram, state.rank_in_bin)
        return bits_to_float((state.high_bin << 16) | low_bin)

    def threshold(self, tensors: Callable[[], Iterable[torch.Tensor]]) -> float:
        """Run both stages over ``tensors()`` (called twice, once per pass): the k-th largest ``|x|``.

        Args:
            tensors: a callable returning a fresh iterable over the model's tensors, so each pass
                can load them one at a time.

        Returns:
            The threshold, as :meth:`stage2_reduce`.
        """
        counts = torch.zeros(self.BINS, dtype=torch.int64)
        for tensor in tensors():
            counts += self.stage1_partial(tensor).cpu()
        state = self.stage1_reduce(counts)
        counts = torch.zeros(self.BINS, dtype=torch.int64)
        for tensor in tensors():
            counts += self.stage2_partial(tensor, state).cpu()
        return self.stage2_reduce(counts, state)


def _check_histogram(histogram: torch.Tensor) -> torch.Tensor:
    """The histogram on CPU as int64, after checking its shape."""
    if histogram.dim() != 1 or histogram.numel() != HISTOGRAM_BINS:
        raise ValueError(f"expected a histogram of {HISTOGRAM_BINS} bins, got shape {tuple(histogram.shape)}")
    return histogram.detach().to("cpu", torch.int64)
