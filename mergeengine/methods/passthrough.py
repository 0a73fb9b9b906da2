"""Passthrough: copy one model's tensors, optionally scaled (mergekit's passthrough, without slices).

```yaml
- {id: m, op: merge, method: passthrough, inputs: [chat], scale: 1.0}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs


@merge_method(name="passthrough", inputs="models", base="none", elementwise=True)
def passthrough(_base: None, models: list[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """``scale · model``.

    Args:
        _base: unused (no base).
        models: exactly one model's values.
        scale: factor applied to every value.

    Returns:
        The scaled values.
    """
    expect_inputs("passthrough", models, 1)
    return models[0] * scale
