"""NearSwap (mergekit's nearswap, after alchemonaut's QuartetAnemoi): take the model's value where
it is close to the base's, keep the base's where they differ much.

Per entry, with ``w = clamp(t / max(|base − model|, 1e-6), 0, 1)``::

    nearswap = w · model + (1 − w) · base

so entries within ``t`` of the base take the model's value, and farther ones move towards the
model by ``t / |base − model|``.

```yaml
- {id: m, op: merge, method: nearswap, base: base, inputs: [chat], t: 0.001}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs

DIFF_FLOOR = 1e-6


@merge_method(name="nearswap", inputs="models", elementwise=True)
def nearswap(base: torch.Tensor, models: list[torch.Tensor], *, t: float) -> torch.Tensor:
    """Entry-wise interpolation towards the model, by ``t`` over the distance.

    Args:
        base: the base's values.
        models: exactly one model's values.
        t: distance below which the model's value is taken.

    Returns:
        The merged values.
    """
    expect_inputs("nearswap", models, 1)
    model = models[0]
    weight = torch.sub(base, model).abs_().clamp_(min=DIFF_FLOOR).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return torch.sub(model, base).mul_(weight).add_(base)
