"""Breadcrumbs with TIES (mergekit's ``breadcrumbs_ties``): Model Breadcrumbs' mask (Davari &
Belilovsky 2023) on each delta, then TIES's sign election and disjoint mean (Yadav et al. 2023).

Per tensor and input: drop the largest ``gamma`` fraction of magnitudes, keep the next
``density`` fraction (exact counts, ties by position; ``gamma: 0`` keeps the top ``density``),
then ``base + lambda · ties(masked, weights)`` as in the ``ties`` method (``vote``,
``normalize``).

```yaml
- {id: m, op: merge, method: breadcrumbs_ties, base: base, inputs: [d_math, d_code], density: 0.3, gamma: 0.01}
```
"""

from __future__ import annotations

from typing import Literal

import torch

from mergeengine.kernels.select_exact import KeepCount
from mergeengine.kernels.sparsify import breadcrumbs
from mergeengine.kernels.ties import ZeroVote
from mergeengine.methods import Density, Fraction, PerInput, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._ties import elect_and_merge
from mergeengine.methods.ties import non_negative_weights


@merge_method(name="breadcrumbs_ties", inputs="deltas", validate=non_negative_weights)
def breadcrumbs_ties(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    *,
    density: PerInput[Density],
    gamma: PerInput[Fraction] = 0.01,
    weights: PerInput[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    vote: Literal["unweighted", "weighted"] = "unweighted",
    int8_mask: bool = False,
    zero_vote: ZeroVote = "zero",
    keep_count: KeepCount = "round",
) -> torch.Tensor:
    """Breadcrumbs mask per input, then TIES.

    Args:
        base: the base's tensor.
        deltas: the deltas.
        density: fraction kept below the dropped top ``gamma``, per input.
        gamma: fraction of the largest magnitudes dropped, per input.
        weights: one weight per input.
        lambda_: scale of the merged delta (recipe field ``lambda``).
        normalize: divide by the summed weights of the agreeing inputs.
        vote: sign election on the plain (``unweighted``) or weighted sum.
        int8_mask: accepted for mergekit configs; no effect.
        zero_vote: what a vote of exactly 0 elects: zero (nothing agrees), or positive (mergekit).
        keep_count: round: counts round(fraction * n); truncate: int(fraction * n), mergekit's counts.

    Returns:
        The merged tensor.
    """
    require_finite("breadcrumbs_ties", labelled(deltas, kind="delta"))
    masked = [breadcrumbs(d, p, g, keep_count) for d, p, g in zip(deltas, density, gamma, strict=True)]
    return elect_and_merge(base, masked, weights, vote=vote, normalize=normalize, lambda_=lambda_, zero_vote=zero_vote)
