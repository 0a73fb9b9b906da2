"""DARE (Yu et al. 2023), then TIES sign election and disjoint mean (no magnitude trim).

```yaml
- {id: merged, op: merge, method: dare_ties, base: base, inputs: [d_math, d_code], density: 0.2}
```
"""

from __future__ import annotations

import torch

from mergeengine.kernels.ties import ZeroVote, ties_merge, ties_merge_into
from mergeengine.methods import Density, PerInput, _dare, merge_method
from mergeengine.methods.ties import Vote, non_negative_weights


@merge_method(name="dare_ties", inputs="deltas", elementwise=True, validate=non_negative_weights,
              prepare=_dare.prepare, provides=_dare.PROVIDES)
def dare_ties(base: torch.Tensor, deltas: list[torch.Tensor], *, density: PerInput[Density],
              rescale: _dare.Rescale = "per_element", vote: Vote = "unweighted", weights: PerInput[float] = 1.0,
              lambda_: float = 1.0, normalize: bool = True, int8_mask: bool = False, zero_vote: ZeroVote = "zero",
              survivors: list[torch.Tensor],
              factors: list[float], numpy_masks: bool, scratch: list[torch.Tensor]) -> torch.Tensor:
    """Drop and rescale each delta, elect the sign, average the agreeing entries.

    Args:
        density: Keep probability, one for all inputs or one per input.
        rescale: per_element: divide survivors by density (paper); l1: match the L1 norm (mergekit); none.
        vote: Weights in the sign vote: unweighted (paper) or weighted (mergekit).
        weights: One weight per input (default 1 each; >= 0).
        lambda_: Scale of the merged delta added to the base.
        normalize: true: divide by the summed weights of the agreeing inputs (paper); false: do not (mergekit's default).
        int8_mask: Accepted for mergekit configs; no effect (masks are never materialised at model scale).
        zero_vote: What a vote of exactly 0 elects: zero (nothing agrees), or positive (mergekit).
    """
    n = base.numel()
    kept = _dare.dropped(deltas, survivors, factors, numpy_masks)
    if not normalize:
        return base.add(ties_merge(kept, weights, vote, normalize=False, zero_vote=zero_vote), alpha=lambda_)
    merged = ties_merge_into(kept, weights, scratch[0][:n], [scratch[1][:n], scratch[2][:n]], vote, zero_vote=zero_vote)
    return torch.add(base, merged, alpha=lambda_, out=merged)
