"""Multi-SLERP: a spherical barycentre of N models, or of their deltas from a base (mergekit's multislerp).

mergekit projects each input onto the unit sphere, takes the weighted mean direction ``m̂``,
interpolates in the tangent space at ``m̂`` and maps back with the exponential map. The weighted
sum of the tangent vectors ``u_i − <u_i, m̂> m̂`` is ``M − |M| m̂ = 0`` for ``M = Σ w_i u_i``, so the
exponential map returns ``m̂`` itself, and the method is, exactly::

    u_i = x_i / (|x_i| + eps)        M = Σ w_i u_i        multislerp = (Σ w_i |x_i|) · M / |M|

(``x_i`` the models, or their deltas and then ``base +`` the result; weights normalised to sum 1
unless ``normalize_weights: false``). This is computed directly. When ``|M| < eps`` (antipodal
inputs with balancing weights) two inputs fall back to ``Σ w_i x_i``; more inputs are an error.
One input is returned unchanged. For the intrinsic (Riemannian) mean use ``karcher``.

```yaml
- {id: m, op: merge, method: multislerp, inputs: [math, code, chat], weights: [0.5, 0.3, 0.2]}
```
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from mergeengine.errors import ExecutionError
from mergeengine.kernels.chunking import spans
from mergeengine.methods import PerInput, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._reduce import CHUNK, distance, norm


def _weights(weights: list[float], normalize: bool) -> list[float]:
    if not normalize:
        return list(weights)
    total = sum(weights)
    if total == 0:
        raise ExecutionError("multislerp: the weights sum to 0 and cannot be normalised")
    return [w / total for w in weights]


def _accumulate(base: torch.Tensor | None, models: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """``Σ c_i (x_i − base)`` (or ``Σ c_i x_i``), chunk by chunk: no whole difference is built, and each
    term is rounded before it is added (no fused multiply-add), so exactly opposite inputs cancel to 0."""
    flat = [m.reshape(-1) for m in models]
    fb = base.reshape(-1) if base is not None else None
    out = torch.zeros_like(flat[0])
    buf = torch.empty(min(out.numel(), CHUNK) or 1, dtype=out.dtype, device=out.device)
    for s, e in spans(out.numel(), CHUNK):
        for c, x in zip(coefs, flat, strict=True):
            term = buf[: e - s]
            torch.sub(x[s:e], fb[s:e], out=term) if fb is not None else term.copy_(x[s:e])
            out[s:e].add_(term.mul_(c))
    return out.view(models[0].shape)


@merge_method(name="multislerp", inputs="models", base="optional")
def multislerp(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    *,
    weights: PerInput[float],
    normalize_weights: bool = True,
    eps: Annotated[float, Field(gt=0)] = 1e-8,
) -> torch.Tensor:
    """The weighted spherical barycentre of the inputs (or of their deltas), scaled to their mean norm.

    Args:
        base: the base's tensor, or None (then the models themselves are interpolated).
        models: the models' tensors.
        weights: one weight per model.
        normalize_weights: divide the weights by their sum.
        eps: added to norms before dividing (mergekit's).

    Returns:
        The merged tensor.
    """
    if len(models) == 1:
        return models[0].clone()
    require_finite("multislerp", labelled(models, base))
    w = _weights(weights, normalize_weights)
    norms = [norm(x) if base is None else distance(x, base) for x in models]
    mean = _accumulate(base, models, [wi / (n + eps) for wi, n in zip(w, norms, strict=True)])
    mean_norm = norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise ExecutionError("multislerp: the weighted directions cancel out (antipodal inputs with "
                                 "balancing weights); change the weights")
        mean = _accumulate(base, models, w)
    else:
        mean.mul_(sum(wi * n for wi, n in zip(w, norms, strict=True)) / mean_norm)
    return mean.add_(base) if base is not None else mean
