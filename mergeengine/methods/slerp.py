"""SLERP: spherical linear interpolation from the base to one model, per tensor (Shoemake 1985).

With ``cos θ = <b, m> / (|b| |m|)`` over the whole tensor::

    slerp(t) = sin((1 − t) θ) / sin θ · b + sin(t θ) / sin θ · m

and plain linear interpolation ``(1 − t) b + t m`` when ``|cos θ| > 0.9995`` (nearly colinear,
including identical and antipodal tensors): mergekit's rule and threshold. A tensor whose norm
is at most 1e-8 counts as cos θ = 0.

```yaml
- {id: m, op: merge, method: slerp, base: base, inputs: [chat], t: 0.3}
- id: m2                      # mergekit's per-layer t: filters and gradients over the layers
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

import math
from collections.abc import Mapping
from typing import Any

import torch

from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs, labelled, require_finite
from mergeengine.methods._gradients import Setting, is_layered, layer_count, resolve
from mergeengine.methods._reduce import gram
from mergeengine.ops.base import Reduction

#: |cos θ| above this interpolates linearly (mergekit's DOT_THRESHOLD).
COLINEAR_COS = 0.9995
#: norms at or below this are not normalised (mergekit's eps).
NORM_EPS = 1e-8


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The two scalars ``(s_a, s_b)`` with ``slerp = s_a · a + s_b · b`` (whole-tensor angle).

    Args:
        t: interpolation weight of ``b`` (0 gives ``a``).
        a: first tensor (float32).
        b: second tensor, same shape.

    Returns:
        The coefficients, as Python floats (float64, from :mod:`~mergeengine.methods._reduce`'s thread-independent sums).
    """
    (aa, ab), (_, bb) = gram([a, b])
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    cos = ab / ((norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0))
    if abs(cos) > COLINEAR_COS:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _layers(params: Mapping[str, Any], tensors: list[str]) -> list[Reduction]:
    return [layer_count("layers", tensors)] if is_layered(params["t"]) else []


def _t_of_tensor(stream: Any, *, t: Setting, **_: Any) -> dict[str, float]:
    return {"t_value": resolve("t", t, stream.ctx.tensor, stream.stats)}


@merge_method(name="slerp", inputs="models", statistics=_layers, prepare=_t_of_tensor, provides=("t_value",))
def slerp(base: torch.Tensor, models: list[torch.Tensor], *, t: Setting, t_value: float) -> torch.Tensor:
    """Spherical interpolation between the base (``t = 0``) and the one input model (``t = 1``).

    Args:
        base: the base's tensor.
        models: exactly one model's tensor.
        t: weight of the input model: a number, a gradient over the layers, or a list of {filter, value}.
        t_value: ``t`` for this tensor (resolved by the engine's prepare hook).

    Returns:
        The interpolated tensor.
    """
    expect_inputs("slerp", models, 1)
    require_finite("slerp", labelled(models, base, "model"))
    s_base, s_model = slerp_coefficients(t_value, base, models[0])
    out = base * s_base
    return out.add_(models[0], alpha=s_model)
