"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

The three steps are separate functions so an engine can trim per tensor
(:func:`ties_trim`) or model-wide (:class:`mergeengine.kernels.quantile.MagnitudeQuantile` then
:func:`mergeengine.kernels.sparsify.threshold_prune`) and then call :func:`ties_merge` on the
trimmed deltas. The result is the merged delta; the engine adds ``base + lambda * merged``.

Deltas are accumulated one at a time (never stacked), so memory is a few tensors of one shape
however many models are merged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from mergeengine.kernels.sparsify import magnitude_prune

VoteMode = Literal["unweighted", "weighted"]
VOTE_MODES: tuple[str, ...] = ("unweighted", "weighted")
ZeroVote = Literal["zero", "positive"]


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim step, per tensor: :func:`~mergeengine.kernels.sparsify.magnitude_prune`.

    Keeps exactly ``floor(density * numel + 0.5)`` entries of largest magnitude (ties to the lowest
    flat index), zeroes the rest, no rescaling.

    Args:
        delta: delta tensor (converted to float32).
        density: keep fraction in [0, 1].

    Returns:
        A new float32 tensor of ``delta``'s shape.

    Raises:
        ValueError: when ``density`` is not in [0, 1].
    """
    return magnitude_prune(delta, density)


def elect_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
               zero_vote: ZeroVote = "zero") -> torch.Tensor:
    """Sign election: ``sign(sum_i D_i)``, or ``sign(sum_i w_i D_i)`` when ``weights`` are given.

    Args:
        deltas: trimmed deltas of one tensor, all of the same shape.
        weights: per-delta weights for a weighted vote (mergekit), or None for the paper's
            unweighted vote.
        zero_vote: what a sum of exactly 0 elects: ``zero`` (nothing agrees) or ``positive``
            (mergekit: ``sum >= 0`` elects +).

    Returns:
        A float32 tensor of -1, 0 and +1; 0 where the (weighted) sum is exactly 0, including
        where every delta is 0 (+1 there with ``zero_vote="positive"``).

    Raises:
        ValueError: on an empty list, mismatched shapes or bad weights.
    """
    vote_weights = _check(deltas, weights if weights is not None else [1.0] * len(deltas))
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for delta, weight in zip(deltas, vote_weights, strict=True):
        total.add_(delta.detach().to(torch.float32), alpha=weight)
    return _zero_vote(total.sign_(), zero_vote)


def _zero_vote(sign: torch.Tensor, zero_vote: ZeroVote) -> torch.Tensor:
    """``positive``: a sum of exactly 0 elects + (zeros still never agree with it)."""
    return sign.masked_fill_(sign == 0, 1.0) if zero_vote == "positive" else sign


def disjoint_mean(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    elected_sign: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted mean, per entry, of the deltas whose sign agrees with the elected sign.

    Delta ``i`` agrees at an entry when ``sign(D_i) == elected != 0``; zeros never agree. Then::

        merged = sum_i w_i D_i [agree_i] / sum_i w_i [agree_i]     (normalize=True)
        merged = sum_i w_i D_i [agree_i]                           (normalize=False)

    An entry where no delta agrees (all zero, elected sign 0, or only zero-weight deltas agree)
    is 0, never NaN.

    Args:
        deltas: trimmed deltas of one tensor, all of the same shape.
        weights: one non-negative weight per delta.
        elected_sign: tensor of -1/0/+1 of the deltas' shape (see :func:`elect_sign`).
        normalize: divide by the summed weights of the agreeing deltas (True, TIES) or not
            (mergekit's ``normalize: false``).

    Returns:
        A new float32 tensor of the deltas' shape.

    Raises:
        ValueError: on an empty list, mismatched shapes or bad weights.
    """
    checked_weights = _check(deltas, weights)
    if elected_sign.shape != deltas[0].shape:
        raise ValueError(
            f"elected_sign has shape {tuple(elected_sign.shape)}, deltas {tuple(deltas[0].shape)}"
        )
    sign = elected_sign.detach().to(torch.float32)
    numerator = torch.zeros(sign.shape, dtype=torch.float32, device=sign.device)
    denominator = torch.zeros_like(numerator)
    zero = torch.zeros((), dtype=torch.float32, device=sign.device)
    for delta, weight in zip(deltas, checked_weights, strict=True):
        values = delta.detach().to(torch.float32)
        agree = (values * sign) > 0  # same non-zero sign; False for zeros and for sign 0
        numerator.add_(torch.where(agree, values, zero), alpha=weight)
        if normalize:
            denominator.add_(agree.to(torch.float32), alpha=weight)
    if not normalize:
        return numerator
    has_weight = denominator != 0
    return torch.where(has_weight, numerator / torch.where(has_weight, denominator, 1.0), zero)


def ties_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    vote: VoteMode = "unweighted",
    normalize: bool = True,
    zero_vote: ZeroVote = "zero",
) -> torch.Tensor:
    """TIES sign election and disjoint mean of already-trimmed deltas of one tensor.

    1. Elect the sign per entry: ``sign(sum_i D_i)`` with ``vote="unweighted"`` (the paper; the
       default) or ``sign(sum_i w_i D_i)`` with ``vote="weighted"`` (mergekit). A sum of exactly 0
       elects 0 and that entry's result is 0.
    2. Disjoint weighted mean of the agreeing, non-zero entries (see :func:`disjoint_mean`)::

           merged = sum_i w_i D_i [sign(D_i) == elected != 0] / sum_i w_i [sign(D_i) == elected != 0]

       with 0 where the denominator is 0 (nothing agrees, all zero), never NaN.

    Why a weighted mean: with equal weights it is exactly the paper's disjoint mean (the paper
    has no per-model weights); with unequal weights each model counts in proportion to its
    weight, as in mergekit. The weights' overall scale cancels (``[2, 2]`` equals ``[1, 1]``),
    so the strength of the merge is the engine's ``lambda``, not the weights. Weights must be
    non-negative: a negative weight would turn the mean into something that is not an average
    of the agreeing values (use task arithmetic to subtract a model).

    Args:
        deltas: trimmed deltas (e.g. from :func:`ties_trim`) of one tensor, same shape.
        weights: one finite non-negative weight per delta.
        vote: ``"unweighted"`` or ``"weighted"``.
        normalize: False gives ``sum_i w_i D_i [agree_i]`` without the division (mergekit's
            ``normalize: false``).
        zero_vote: ``positive`` elects + where the vote is exactly 0 (mergekit).

    Returns:
        The merged delta, a new float32 tensor of the deltas' shape.

    Raises:
        ValueError: on an empty list, mismatched shapes or lengths, bad weights or vote.

    Example:
        >>> a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])
        >>> ties_merge([a, b], [1.0, 1.0])
        tensor([ 2., -2.,  0.])
    """
    if vote not in VOTE_MODES:
        raise ValueError(f"vote must be one of {', '.join(VOTE_MODES)}; got {vote!r}")
    elected = elect_sign(deltas, weights if vote == "weighted" else None, zero_vote)
    return disjoint_mean(deltas, weights, elected, normalize=normalize)


def ties_merge_into(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    scratch: Sequence[torch.Tensor],
    vote: VoteMode = "unweighted",
    normalize: bool = True,
    zero_vote: ZeroVote = "zero",
) -> torch.Tensor:
    """:func:`ties_merge` of float32 chunks into ``out``, with no allocation.

    Same bytes as :func:`ties_merge`. Instead of masking each delta by ``sign(D_i) == elected``,
    it accumulates ``w_i * max(D_i * s, 0)`` (``s`` the elected sign, -1/0/+1), which is
    ``w_i * |D_i|`` exactly where the delta agrees and 0 elsewhere, then multiplies the sum by
    ``s``: multiplying by +-1 is exact and rounding is symmetric, so the numerator is the same
    float as the masked sum. ``sign(max(D_i * s, 0))`` is the agreement indicator for the
    denominator. Five in-place float32 ops per delta, all on cache-resident chunks.

    Args:
        deltas: trimmed float32 chunks of one shape (overwritten: used as scratch).
        weights: one non-negative weight per delta (validated by the caller's schema).
        out: float32 chunk for the result.
        scratch: two float32 chunks of the same shape (the elected sign and the denominator).
        vote: ``"unweighted"`` or ``"weighted"``.
        normalize: divide by the agreeing weights (the disjoint mean) or not (mergekit's ``normalize: false``).
        zero_vote: ``positive`` elects + where the vote is exactly 0 (mergekit).

    Returns:
        ``out``.
    """
    sign, denominator = scratch[0], scratch[1]
    _zero_vote(_vote_sum(deltas, weights, vote == "weighted", sign).sign_(), zero_vote)
    torch.mul(deltas[0], sign, out=out).clamp_(min=0.0)  # |D_0| where it agrees, else 0: the first terms
    torch.sign(out, out=denominator)
    if weights[0] != 1.0:
        out.mul_(weights[0])
        denominator.mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        agreeing = torch.mul(delta, sign, out=delta).clamp_(min=0.0)  # |D_i| where it agrees, else 0
        out.add_(agreeing, alpha=weight)
        denominator.add_(agreeing.sign_(), alpha=weight)
    out.mul_(sign)
    if not normalize:
        return out.add_(0.0)
    # Where nothing agrees the numerator is 0 and so is the result. A non-zero denominator is a
    # sum of positive weights, so it is >= the smallest positive weight: clamping to that weight
    # changes only the zeros (a division by 1 there would need a compare and a masked fill).
    denominator.clamp_(min=min((w for w in weights if w > 0), default=1.0))
    return out.div_(denominator).add_(0.0)  # + 0.0 turns the -0.0 of "nothing agrees" into 0.0


def _vote_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], weighted: bool,
              out: torch.Tensor) -> torch.Tensor:
    """The sign vote's sum into ``out``: ``sum w_i D_i`` (weighted) or ``sum D_i``."""
    if weighted:  # 0 + w*D rounds like w*D: the same floats as summing from zero
        torch.mul(deltas[0], weights[0], out=out)
        summed = 1
    elif len(deltas) > 1:  # D_0 + D_1 in one op (0 + D_0 is D_0, exactly)
        torch.add(deltas[0], deltas[1], out=out)
        summed = 2
    else:
        out.copy_(deltas[0])
        summed = 1
    for delta, weight in zip(deltas[summed:], weights[summed:], strict=True):
        out.add_(delta, alpha=weight if weighted else 1.0)
    return out


def _check(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> list[float]:
    """Validate the deltas and weights of one merge; return the weights as floats."""
    if len(deltas) == 0:
        raise ValueError("need at least one delta")
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    shape = deltas[0].shape
    for index, delta in enumerate(deltas):
        if delta.shape != shape:
            raise ValueError(f"delta {index} has shape {tuple(delta.shape)}, delta 0 has {tuple(shape)}")
    checked = [float(weight) for weight in weights]
    for index, weight in enumerate(checked):
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"weight {index} must be finite and >= 0, got {weights[index]!r}")
    return checked
