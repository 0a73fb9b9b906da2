"""SLERP: spherical linear interpolation from the base to one model, per tensor (Shoemake 1985).

With ``cos θ = <b, m> / (|b| |m|)`` over the whole tensor::

    slerp(t) = sin((1 − t) θ) / sin θ · b + sin(t θ) / sin θ · m

and plain linear interpolation ``(1 − t) b + t m`` when ``|cos θ| > 0.9995`` (nearly colinear,
including identical and antipodal tensors): mergekit's rule and threshold. A tensor whose norm
is at most 1e-8 counts as cos θ = 0.

```yaml
- {id: m, op: merge, method: slerp, base: base, inputs: [chat], t: 0.3}
- id: m2                      # mergekit's per-layer t: a parameter schedule (docs/recipes.md)
  op: merge
  method: slerp
  base: base
  inputs: [chat]
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - {value: 0.5}
```
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergeengine.errors import NonFiniteError
from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs
from mergeengine.methods._reduce import Gram, gram

#: |cos θ| above this interpolates linearly (mergekit's DOT_THRESHOLD).
COLINEAR_COS = 0.9995
#: norms at or below this are not normalised (mergekit's eps).
NORM_EPS = 1e-8


def coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """``(s_a, s_b)`` with ``slerp = s_a · a + s_b · b``, from ``<a, a>``, ``<b, b>`` and ``<a, b>``."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    cos = ab / ((norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0))
    if abs(cos) > COLINEAR_COS:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """:func:`coefficients` of two whole tensors (float32, same shape)."""
    (aa, ab), (_, bb) = gram([a, b])
    return coefficients(t, aa, bb, ab)


def _coefficients_of_tensor(stream: Any, *, t: float, **_: Any) -> dict[str, float]:
    """A first pass over the tensor's chunks: its dot products, then this tensor's two coefficients."""
    expect_inputs("slerp", stream.inputs, 1)
    acc = Gram(2)
    for _, _, base, chunk in stream.chunks():
        acc.add([base, chunk[0]])
    (aa, ab), (_, bb) = acc.matrix()
    for label, value in (("the base", aa), ("model 1", bb)):
        if not math.isfinite(value):
            raise NonFiniteError(f"slerp: {label} has NaN or Inf values")
    s_base, s_model = coefficients(t, aa, bb, ab)
    return {"s_base": s_base, "s_model": s_model}


@merge_method(name="slerp", inputs="models", elementwise=True,
              prepare=_coefficients_of_tensor, provides=("s_base", "s_model"))
def slerp(base: torch.Tensor, models: list[torch.Tensor], *, t: float, s_base: float,
          s_model: float) -> torch.Tensor:
    """Spherical interpolation between the base (``t = 0``) and the one input model (``t = 1``).

    The angle needs the whole tensor: the engine's prepare pass sums the dot products over the
    tensor's chunks, then this runs chunk by chunk with the tensor's two coefficients.

    Args:
        base: a chunk of the base.
        models: the same chunk of the one model.
        t: weight of the input model (per layer as any parameter: a gradient, or a list of {filter, value}).
        s_base: the base's coefficient for this tensor (from the prepare pass).
        s_model: the model's coefficient for this tensor (from the prepare pass).

    Returns:
        The interpolated chunk.
    """
    return torch.mul(base, s_base).add_(models[0], alpha=s_model)
