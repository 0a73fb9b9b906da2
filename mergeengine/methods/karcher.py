"""Karcher mean: the Riemannian centre of mass of N models on the unit sphere, rescaled (mergekit's karcher).

Each tensor ``x_i`` is a norm ``n_i`` and a direction ``u_i = x_i / n_i``. Starting from the
normalised mean direction, the mean ``u`` takes Riemannian gradient steps (Karcher 1977)::

    θ_i = arccos <u, u_i>        T = Σ a_i θ_i / sin θ_i · (u_i − <u, u_i> u)
    u ← cos |T| · u + sin |T| · T / |T|

until ``|T| < tol`` or ``max_iter`` steps; terms with ``θ_i < tol`` are skipped. The result is
``(Σ n_i / N) · u``. Inputs weigh equally (``a_i = 1/N``, renormalised over the inputs whose norm
exceeds ``tol``); all-zero inputs give zeros. Base models are not used.

```yaml
- {id: m, op: merge, method: karcher, inputs: [math, code, chat], max_iter: 10, tol: 1.0e-5}
```
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from mergeengine.methods import merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._reduce import dot, norm


def _start(units: list[tuple[float, float, torch.Tensor]], tol: float) -> torch.Tensor:
    """The normalised weighted mean direction (the first direction when they cancel)."""
    u = torch.zeros_like(units[0][2])
    for a, n, x in units:
        u.add_(x, alpha=a / n)
    size = norm(u)
    if size < tol:
        return u.copy_(units[0][2]).div_(units[0][1])
    return u.div_(size)


def _step(u: torch.Tensor, units: list[tuple[float, float, torch.Tensor]], tol: float,
          out: torch.Tensor) -> float:
    """The tangent vector ``T`` at ``u`` into ``out``; returns ``|T|``."""
    out.zero_()
    along = 0.0
    for a, n, x in units:
        cos = max(-1.0, min(1.0, dot(u, x) / n))
        theta = math.acos(cos)
        if theta < tol:
            continue
        c = a * theta / math.sin(theta)
        out.add_(x, alpha=c / n)
        along += c * cos
    out.add_(u, alpha=-along)
    return norm(out)


@merge_method(name="karcher", inputs="models", base="none", compute_bound=True)
def karcher(_base: None, models: list[torch.Tensor], *, max_iter: Annotated[int, Field(ge=1)] = 10,
            tol: Annotated[float, Field(gt=0)] = 1e-5) -> torch.Tensor:
    """The Karcher mean direction of the inputs times their mean norm.

    Args:
        _base: unused (no base).
        models: the models' tensors.
        max_iter: most gradient steps.
        tol: stop when the tangent step is shorter; also the smallest norm and angle that count.

    Returns:
        The merged tensor.
    """
    if len(models) == 1:
        return models[0].clone()
    require_finite("karcher", labelled(models))
    norms = [norm(x) for x in models]
    valid = [(n, x) for n, x in zip(norms, models, strict=True) if n > tol]
    if not valid:
        return torch.zeros_like(models[0])
    units = [(1.0 / len(valid), n, x) for n, x in valid]
    u = _start(units, tol)
    tangent = torch.empty_like(u)
    for _ in range(max_iter):
        size = _step(u, units, tol, tangent)
        if size < tol:
            break
        stepped = tangent.mul_(math.sin(size) / size).add_(u, alpha=math.cos(size))
        tangent, u = u, stepped  # the old mean's buffer holds the next tangent
        length = norm(u)
        if length > tol:
            u.div_(length)
    return u.mul_(sum(norms) / len(models))
