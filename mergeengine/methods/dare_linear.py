"""DARE (Yu et al. 2023), then task arithmetic: ``base + lambda * sum_i w_i dare(delta_i)``.

```yaml
- {id: merged, op: merge, method: dare_linear, base: base, inputs: [d_math, d_code], density: 0.3}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import Density, PerInput, _dare, merge_method


@merge_method(name="dare_linear", inputs="deltas", elementwise=True, prepare=_dare.prepare, provides=_dare.PROVIDES)
def dare_linear(base: torch.Tensor, deltas: list[torch.Tensor], *, density: PerInput[Density],
                rescale: _dare.Rescale = "per_element", weights: PerInput[float] = 1.0, lambda_: float = 1.0,
                normalize: bool = False, int8_mask: bool = False, survivors: list[torch.Tensor], factors: list[float], numpy_masks: bool,
                scratch: list[torch.Tensor]) -> torch.Tensor:
    """Drop and rescale each delta, then add their weighted sum, times lambda, to the base.

    Args:
        density: Keep probability, one for all inputs or one per input.
        rescale: per_element: divide survivors by density (paper); l1: match the L1 norm (mergekit); none.
        weights: One weight per input (default 1 each).
        lambda_: Scale of the merged delta added to the base.
        normalize: divide the weighted sum by the sum of the weights (when it is not about 0).
        int8_mask: Accepted for mergekit configs; no effect (masks are never materialised at model scale).
    """
    merged = scratch[0][: base.numel()].zero_()
    for w, d in zip(weights, _dare.dropped(deltas, survivors, factors, numpy_masks), strict=True):
        merged.add_(d, alpha=w)
    if normalize and abs(sum(weights)) > 1e-8:
        merged.div_(sum(weights))
    return torch.add(base, merged, alpha=lambda_, out=merged)
