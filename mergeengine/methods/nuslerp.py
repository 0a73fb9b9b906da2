"""NuSLERP: SLERP between two models by their weights, per row or whole tensor (mergekit's nuslerp).

``t = w_2 / (w_1 + w_2)`` (0.5 when the weights sum to about 0). Vectors are the flattened
tensor (``nuslerp_flatten: true``, the default), each row (the last dimension), or each column
(``nuslerp_row_wise: true``: vectors along the first dimension, mergekit's naming). Per vector,
with ``cos θ = <a, b> / (max(|a|, 1e-7) max(|b|, 1e-7))``::

    nuslerp = sin((1 − t) θ) / sin θ · a + sin(t θ) / sin θ · b

or ``(1 − t) a + t b`` where ``|sin θ| < 1e-8``. With a base, ``a`` and ``b`` are the two models'
deltas and the result is ``base + nuslerp(deltas)``.

```yaml
- {id: m, op: merge, method: nuslerp, base: base, inputs: [math, code], weights: [0.6, 0.4]}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import PerInput, merge_method
from mergeengine.methods._checks import expect_inputs, labelled, require_finite
from mergeengine.methods._reduce import column_dots, row_dots

NORM_FLOOR = 1e-7
COLINEAR_SIN = 1e-8


def vectors(x: torch.Tensor, flatten: bool, row_wise: bool) -> tuple[torch.Tensor, int]:
    """``x`` as a 2-D view and the dimension its vectors run along (1: rows, 0: columns)."""
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1), 1
    if row_wise:
        return x.reshape(x.shape[0], -1), 0
    return x.reshape(-1, x.shape[-1]), 1


def coefficients(t: float, a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector SLERP coefficients of 2-D ``a`` and ``b``, shaped to broadcast against them."""
    dots = row_dots if dim == 1 else column_dots
    norm_a = dots(a, a).sqrt().clamp(min=NORM_FLOOR)
    norm_b = dots(b, b).sqrt().clamp(min=NORM_FLOOR)
    theta = torch.acos((dots(a, b) / (norm_a * norm_b)).clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    colinear = sin.abs() < COLINEAR_SIN
    safe = torch.where(colinear, 1.0, sin)
    c_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe).float()
    c_b = torch.where(colinear, t, torch.sin(t * theta) / safe).float()
    return (c_a.unsqueeze(1), c_b.unsqueeze(1)) if dim == 1 else (c_a.unsqueeze(0), c_b.unsqueeze(0))


@merge_method(name="nuslerp", inputs="models", base="optional")
def nuslerp(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    *,
    weights: PerInput[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """SLERP of two models (or of their deltas from the base) at ``t = w_2 / (w_1 + w_2)``.

    Args:
        base: the base's tensor, or None.
        models: exactly two models' tensors.
        weights: one weight per model.
        nuslerp_flatten: one angle for the whole tensor.
        nuslerp_row_wise: without flattening, vectors along the first dimension instead of the last.

    Returns:
        The interpolated tensor.
    """
    expect_inputs("nuslerp", models, 2)
    require_finite("nuslerp", labelled(models, base))
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    a, b = (models[0], models[1]) if base is None else (models[0] - base, models[1] - base)
    va, dim = vectors(a, nuslerp_flatten, nuslerp_row_wise)
    vb, _ = vectors(b, nuslerp_flatten, nuslerp_row_wise)
    c_a, c_b = coefficients(t, va, vb, dim)
    out = va.mul_(c_a) if base is not None else va * c_a
    out.addcmul_(vb, c_b)
    out = out.view(models[0].shape)
    return out.add_(base) if base is not None else out
