"""Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest ``gamma`` and the smallest
magnitudes, keep the ``density`` fraction in between, then task arithmetic.

```yaml
- {id: merged, op: merge, method: breadcrumbs, base: base, inputs: [d_math, d_code], density: 0.2, gamma: 0.01}
```
"""

from __future__ import annotations

import torch

from mergeengine.kernels import sparsify
from mergeengine.kernels.select_exact import KeepCount
from mergeengine.methods import Density, Fraction, PerInput, merge_method


@merge_method(name="breadcrumbs", inputs="deltas", compute_bound=True)
def breadcrumbs(base: torch.Tensor, deltas: list[torch.Tensor], *, density: PerInput[Density],
                gamma: PerInput[Fraction] = 0.01, weights: PerInput[float] = 1.0,
                lambda_: float = 1.0, normalize: bool = False, int8_mask: bool = False,
                keep_count: KeepCount = "round") -> torch.Tensor:
    """Per tensor: the breadcrumbs band of each delta, then ``base + lambda * sum_i w_i delta_i``.

    Args:
        density: Fraction kept after dropping the top gamma (one value, or one per input).
        gamma: Fraction of largest magnitudes dropped (one value, or one per input).
        weights: One weight per input (default 1 each).
        lambda_: Scale of the merged delta added to the base.
        normalize: divide the weighted sum by the sum of the weights (when it is not about 0).
        int8_mask: Accepted for mergekit configs; no effect (masks are never materialised at model scale).
        keep_count: round: counts round(fraction * n); truncate: int(fraction * n), mergekit's counts.
    """
    merged = torch.zeros_like(deltas[0])
    for w, d, p, g in zip(weights, deltas, density, gamma, strict=True):
        merged.add_(sparsify.breadcrumbs(d, p, g, keep_count), alpha=w)
    if normalize and abs(sum(weights)) > 1e-8:
        merged.div_(sum(weights))
    return base.add(merged, alpha=lambda_)
