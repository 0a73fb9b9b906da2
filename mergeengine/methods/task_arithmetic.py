"""Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i delta_i``.

```yaml
- {id: merged, op: merge, method: task_arithmetic, base: base, inputs: [d_math, d_code], weights: [1.0, 0.5], lambda: 0.7}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import PerInput, merge_method


@merge_method(name="task_arithmetic", inputs="deltas", elementwise=True)
def task_arithmetic(base: torch.Tensor, deltas: list[torch.Tensor], *, weights: PerInput[float] = 1.0,
                    lambda_: float = 1.0) -> torch.Tensor:
    """The weighted sum of the deltas, scaled by lambda, added to the base.

    Args:
        weights: One weight per input (default 1 each).
        lambda_: Scale of the merged delta added to the base.
    """
    merged = deltas[0].mul_(weights[0])
    for w, d in zip(weights[1:], deltas[1:], strict=True):
        merged.add_(d, alpha=w)
    return torch.add(base, merged, alpha=lambda_, out=merged)
