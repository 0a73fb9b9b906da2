"""DPPA kernels, Dynamic Partition Amplification (DPA): each partition of a delta rescaled by its factor.

A tensor's partitions are nested magnitude bands: partition ``k`` holds the entries kept at
density ``d_k`` but not at ``d_{k-1}`` (the rule of
:func:`~mergeengine.kernels.dp_density.dp_keep_mask`), and is multiplied by ``s_k``; entries not
kept at the last density are 0 (docs/recipes.md). The densities come from
:func:`~mergeengine.kernels.dp_density.dp_densities` (one call per ``d_k``) or are the targets
themselves (:func:`dpa_amplify_magnitude_tensor`). The thresholds of every partition are selected
in one streamed read (a sample predicts a window around each), and :class:`PartitionScaler` then
amplifies any chunk of the delta, so a merge can amplify the chunks it reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mergeengine.kernels.chunking import Delta, delta_numel, value_chunks
from mergeengine.kernels.prune_rule import PruneRule, pruned_count
from mergeengine.kernels.select_exact import bits_to_float
from mergeengine.kernels.select_sampled import sample_float32, samples_help, select_abs_ranks_sampled

__all__ = [
    "PartitionScaler",
    "dpa_amplify_magnitude_tensor",
    "dpa_amplify_tensor",
    "release_factors",
]


def dpa_amplify_tensor(delta: Delta, densities: Sequence[float], scales: Sequence[float],
                       rule: PruneRule = "exact") -> torch.Tensor:
    """DPA with DP selection: rescale each partition of one delta by its own factor.

    Partition k holds the entries kept at ``densities[k]`` but not at ``densities[k-1]`` (by
    :func:`~mergeengine.kernels.dp_density.dp_keep_mask`, so nested even with ties); they are multiplied by ``scales[k]``.
    Entries not kept at the last density are 0.

    Args:
        delta: the tensor's delta, or the ``(model, base)`` pair it is the difference of
            (computed chunk by chunk, never stored; the result is then float32).
        densities: this module's DP densities ``d_lj(d_k)``, one per partition (call
            :func:`~mergeengine.kernels.dp_density.dp_densities` once per partition target ``d_k``). Non-decreasing: clamping can
            make two equal, which leaves the later partition empty.
        scales: the factor of each partition. For the release's behaviour pass
            ``release_factors(s)[0]``.

    Returns:
        The rescaled, pruned delta; same shape and dtype.

    Raises:
        ValueError: lengths differ, no partition, a density outside [0, 1] or decreasing.
    """
    _check_partitions(densities, scales, strictly_increasing=False)
    return _scale_partitions(delta, densities, scales, rule)


def dpa_amplify_magnitude_tensor(
    delta: Delta, densities: Sequence[float], scales: Sequence[float], rule: PruneRule = "exact"
) -> torch.Tensor:
    """DPA with plain per-tensor magnitude selection.

    Same partition rule as :func:`dpa_amplify_tensor`, but every tensor uses the partition
    targets ``d_k`` themselves (no DP offsets).

    Args:
        delta: the tensor's delta.
        densities: partition targets ``d_1 < d_2 < ...`` in [0, 1].
        scales: the factor of each partition.

    Returns:
        The rescaled, pruned delta; same shape and dtype.

    Raises:
        ValueError: lengths differ, no partition, a density outside [0, 1] or not increasing.

    Example:
        >>> dpa_amplify_magnitude_tensor(torch.tensor([4.0, -1.0, 3.0, 2.0]), [0.25, 0.5], [2.0, 0.5])
        tensor([8.0000, 0.0000, 1.5000, 0.0000])
    """
    _check_partitions(densities, scales, strictly_increasing=True)
    return _scale_partitions(delta, densities, scales, rule=rule)


def release_factors(scales: Sequence[float]) -> tuple[list[float], float]:
    """The factors that reproduce the release's DPA, given the recipe's partition scales.

    The release runs DP once per partition ``j`` (at ``d_j``, scaled by ``s_j``) and merges the
    runs element-wise with "larger magnitude wins". An entry of partition ``k`` is kept by the
    runs ``j >= k`` (masks are nested), where it is worth ``s_j * D``; the pick therefore gives it
    ``max(s_k, ..., s_n)``: a running maximum taken from the last partition backwards. With
    two partitions that is ``(max(s_1, s_2), s_2)``. The tensors DP leaves dense (embeddings,
    norms, lm_head) are dense in every run, so they get ``max(s_1, ..., s_n)``.

    Args:
        scales: ``s_1, ..., s_n`` in partition order, each >= 0 (with negative factors the
            magnitude pick would be sign-ambiguous).

    Returns:
        ``(partition_factors, dense_factor)``: pass ``partition_factors`` as ``scales`` to
        :func:`dpa_amplify_tensor` and multiply non-prunable deltas by ``dense_factor``.

    Raises:
        ValueError: no scale, or a negative or non-finite scale.

    Example:
        >>> release_factors([1.8, 0.0])  # release defaults
        ([1.8, 0.0], 1.8)
        >>> release_factors([1.0, 1.5])
        ([1.5, 1.5], 1.5)
    """
    if not scales:
        raise ValueError("release_factors needs at least one scale")
    if any(not (math.isfinite(s) and s >= 0.0) for s in scales):
        raise ValueError(f"DPA scales must be finite and >= 0, got {list(scales)}")
    factors = [float(s) for s in scales]
    for k in range(len(factors) - 2, -1, -1):
        factors[k] = max(factors[k], factors[k + 1])
    return factors, factors[0]



def _check_partitions(
    densities: Sequence[float], scales: Sequence[float], *, strictly_increasing: bool
) -> None:
    if len(densities) != len(scales) or not densities:
        raise ValueError(
            f"need one scale per density and at least one partition: {list(densities)}, {list(scales)}"
        )
    if any(not 0.0 <= d <= 1.0 for d in densities):
        raise ValueError(f"densities must be in [0, 1], got {list(densities)}")
    for low, high in zip(densities, densities[1:], strict=False):
        if high < low or (strictly_increasing and high == low):
            order = "increasing" if strictly_increasing else "non-decreasing"
            raise ValueError(f"partition densities must be {order}, got {list(densities)}")


def _bands(thresholds: Sequence[int], scales: Sequence[float]) -> list[tuple[float, float]] | None:
    """``(lambd, scale)`` per partition, lowest threshold first, for :func:`_scale_bands`; None
    when the fused path does not apply: a zero scale or a keep-everything partition (threshold
    -1), where a ``-0.0`` must survive, or a NaN threshold."""
    if any(not (math.isfinite(x) and x > 0) for x in scales) or any(not 0 <= t <= 0x7F800000 for t in thresholds):
        return None
    # lowest threshold first; among equal thresholds the partition listed first wins (as in the
    # masked path), so it must come last: the band of the others is then empty
    order = sorted(range(len(scales)), key=lambda i: (thresholds[i], -i))
    return [(bits_to_float(thresholds[i]), float(scales[i])) for i in order]


def _scale_bands(chunk: torch.Tensor, bands: list[tuple[float, float]], out: torch.Tensor,
                 band: torch.Tensor, nxt: torch.Tensor) -> bool:
    """``out = sum_k s_k * (h_k - h_{k+1})`` with ``h_k = hardshrink(D, t_k)``: ``|D| > t_k`` kept.

    Every entry lies in exactly one band, so each output is one product ``D * s_k`` plus +0.0
    terms: the same float as the masked path's. Vectorised ops only (a bool compare costs ~0.5 ns
    per entry here, a hardshrink 0.17). False (``out`` unspecified) when the chunk is not finite:
    ``inf - inf`` would be NaN, so the caller redoes that chunk with the masked path.
    """
    torch.hardshrink(chunk, bands[0][0], out=band)
    for index, (_, scale) in enumerate(bands):
        if index + 1 < len(bands):
            torch.hardshrink(chunk, bands[index + 1][0], out=nxt)
            band.sub_(nxt)
        if index == 0:  # 0 + s*b rounds like s*b (and scales are positive: no -0.0)
            torch.mul(band, scale, out=out)
        else:
            out.add_(band, alpha=scale)
        band, nxt = nxt, band
    return bool(torch.isfinite(torch.sum(out)))


class PartitionScaler:
    """DPA's per-chunk rule for one tensor, once its partition thresholds are selected.

    ``PartitionScaler(delta, densities, scales)`` selects the thresholds of every partition in
    the same streamed pass: on the CPU a sample of the delta predicts a window around each
    threshold (:func:`~mergeengine.kernels.select_sampled.select_abs_ranks_sampled`; two histogram
    passes when one falls outside its window). :meth:`scale` then turns any chunk of the delta
    into the amplified chunk. The result
    of a tensor is the concatenation of its scaled chunks, in any chunking: a merge can so
    amplify each chunk it reads instead of reading a materialised amplified delta.
    """

    def __init__(self, delta: Delta, densities: Sequence[float], scales: Sequence[float],
                 rule: PruneRule = "exact") -> None:
        numel = delta_numel(delta)
        ks = [pruned_count(numel, d, rule) for d in densities]
        wanted = sorted({k for k in ks if k > 0})

        def chunks() -> Iterator[torch.Tensor]:
            return (c for _, c in value_chunks(delta))

        if not wanted:
            selected = []
        else:  # a sample predicts a window around each threshold: usually one read
            selected = select_abs_ranks_sampled(chunks, numel, wanted, _sample(delta) if samples_help(numel) else None)
        picked = dict(zip(wanted, selected, strict=True))
        # keep |D| strictly above the k-th smallest magnitude; k = 0 keeps everything (bits > -1)
        thresholds = [picked[k].bits if k > 0 else -1 for k in ks]
        # Widest partition first; each narrower (nested) partition overwrites, so an entry ends with
        # the factor of the first partition it enters, and 0 outside the widest.
        self.order = list(reversed(list(zip(thresholds, scales, strict=True))))
        self.bands = _bands(thresholds, scales)
        self._scratch: list[torch.Tensor] = []

    def _buffers(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        n = chunk.numel()
        if not self._scratch or self._scratch[0].numel() < n or self._scratch[0].device != chunk.device:
            self._scratch = [torch.empty(n, dtype=dtype, device=chunk.device)
                             for dtype in (torch.float32, torch.float32, torch.float32, torch.int32, torch.bool)]
        return [b[:n] for b in self._scratch]

    def scale(self, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (float32, the chunk's length) = the amplified values of ``chunk`` (float32 delta)."""
        band, nxt, scaled, bits, mask = self._buffers(chunk)
        if self.bands and _scale_bands(chunk, self.bands, out, band, nxt):
            return out
        order = self.order
        torch.bitwise_and(chunk.view(torch.int32), 0x7FFFFFFF, out=bits)
        torch.mul(chunk, order[0][1], out=out).masked_fill_(torch.le(bits, order[0][0], out=mask), 0.0)
        for bits_k, scale in order[1:]:
            torch.where(torch.gt(bits, bits_k, out=mask), torch.mul(chunk, scale, out=scaled), out, out=out)
        return out


def _sample(delta: Delta) -> np.ndarray | None:
    """The delta's entries at :func:`~mergeengine.kernels.select_sampled.sample_index` (float32; a
    pair's ``model - base``, as its chunks compute it), or None off the CPU."""
    if isinstance(delta, tuple):
        model, base = delta
        if model.device.type != "cpu" or base.device.type != "cpu":
            return None
        return sample_float32(model) - sample_float32(base)
    return sample_float32(delta) if delta.device.type == "cpu" else None


def _scale_partitions(delta: Delta, densities: Sequence[float], scales: Sequence[float],
                      rule: PruneRule = "exact") -> torch.Tensor:
    """Chunk by chunk: entries ranked by :func:`~mergeengine.kernels.dp_density.dp_keep_mask`'s rule, the thresholds of every
    partition selected in the same streamed pass(es) (see :class:`PartitionScaler`), the result
    written once."""
    scaler = PartitionScaler(delta, densities, scales, rule)
    like = delta[0] if isinstance(delta, tuple) else delta
    result = torch.empty(delta_numel(delta), dtype=torch.float32, device=like.device)
    for start, chunk in value_chunks(delta):
        scaler.scale(chunk, result[start : start + chunk.numel()])
    out_dtype = torch.float32 if isinstance(delta, tuple) else delta.dtype
    return result.view(like.shape).to(out_dtype)
