"""Model Stock (Jang et al. 2024, arXiv 2403.19522): move from the base towards the average of
N >= 2 fine-tunes by a ratio set by the angle between their deltas.

Per tensor (or per row with ``filter_wise: true``; a 1-D tensor is one row), with ``cos θ`` the
mean over pairs ``i < j`` of ``<D_i, D_j> / max(|D_i| |D_j|, 1e-6)``::

    t = N cos θ / (1 + (N − 1) cos θ)        model_stock = base + t · (Σ D_i / N)

The paper's ratio assumes ``cos θ >= 0`` (fine-tunes of one base); with ``negative_cos: clamp``
(the default) a negative mean cosine is taken as 0 (the base: nothing the fine-tunes agree on);
``negative_cos: extrapolate`` keeps it, as mergekit does, giving a negative ``t`` (the ratio
formula as it is; at ``cos θ = −1/(N − 1)`` exactly, where ``t`` is undefined, the run stops
with an error naming the step and the tensor, before anything is written).

```yaml
- {id: m, op: merge, method: model_stock, base: base, inputs: [math, code], filter_wise: false}
```
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

from mergeengine.errors import ExecutionError, NonFiniteError
from mergeengine.kernels.chunking import spans
from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_at_least, labelled, require_finite
from mergeengine.methods._reduce import Gram, gram, row_dots
from mergeengine.ops.chunks import PerChunk, merge_chunk

NORM_PRODUCT_FLOOR = 1e-6
#: ``|1 + (N − 1) cos θ|`` at or below this is an exact cancellation up to float64 rounding (``t`` undefined).
SINGULAR_DENOMINATOR = 1e-12

NegativeCos = Literal["clamp", "extrapolate"]


def _row_gram(rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``<D_i, D_j>`` per row (float64 ``[rows]``); one pass over the deltas when there is one row."""
    if rows[0].shape[0] == 1:
        return [[torch.tensor([v], dtype=torch.float64) for v in line] for line in gram(rows)]
    return [[row_dots(a, b) for b in rows] for a in rows]


def _undefined_ratio(n: int, row: int | None = None) -> str:
    """The message for a mean cosine of ``-1/(n - 1)`` (to float64 rounding): the ratio's denominator is 0."""
    where = "" if row is None else f"row {row}: "
    return (f"model_stock: {where}the interpolation ratio is undefined: 1 + (N - 1)·cos θ = 0 (N = {n}, "
            f"cos θ = -1/{n - 1}: the deltas cancel out); use negative_cos: clamp")


def stock_ratio_of_gram(g: list[list[float]], negative_cos: NegativeCos = "clamp") -> float:
    """``t`` from the dot products of the deltas (one vector each); a negative mean cosine taken as 0
    unless ``negative_cos`` is ``extrapolate``."""
    n = len(g)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(max(-1.0, min(1.0, g[i][j] / max(math.sqrt(g[i][i] * g[j][j]), NORM_PRODUCT_FLOOR)))
              for i, j in pairs) / len(pairs)
    if negative_cos == "clamp":
        cos = max(cos, 0.0)
    denominator = 1 + (n - 1) * cos
    if abs(denominator) <= SINGULAR_DENOMINATOR:
        raise ExecutionError(_undefined_ratio(n))
    return n * cos / denominator


def stock_ratio(deltas: list[torch.Tensor], negative_cos: NegativeCos = "clamp") -> torch.Tensor:
    """``t`` per row of the 2-D ``deltas`` (float64, shape ``[rows, 1]``); see :func:`stock_ratio_of_gram`."""
    g = _row_gram(deltas)
    pairs = [(i, j) for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    cos = sum((g[i][j] / (g[i][i].sqrt() * g[j][j].sqrt()).clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1)
              for i, j in pairs) / len(pairs)
    if negative_cos == "clamp":
        cos = cos.clamp(min=0.0)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = (denominator.abs() <= SINGULAR_DENOMINATOR).nonzero()
    if len(singular):
        raise ExecutionError(_undefined_ratio(n, int(singular[0])))
    return (n * cos / denominator).reshape(-1, 1)


def _ratio(stream: Any, *, filter_wise: bool, negative_cos: NegativeCos = "clamp", **_: Any) -> dict[str, Any]:
    """A first pass over the tensor: the ratio ``t`` (one number, or per row a chunk of per-entry values)."""
    n = len(stream.inputs)
    expect_at_least("model_stock", stream.inputs, 2)
    if filter_wise and len(stream.shape) > 1:  # per-row dots: the rows, whole
        _, deltas = stream.whole()
        require_finite("model_stock", labelled(deltas, kind="delta"))
        rows = stream.shape[-1]
        t = stock_ratio([d.reshape(-1, rows) for d in deltas], negative_cos).float().reshape(-1)

        def per_entry() -> Iterator[torch.Tensor]:
            for start, end in spans(stream.numel, merge_chunk()):
                yield t[torch.arange(start, end, device=t.device) // rows]
        return {"ratio": PerChunk(per_entry())}
    acc = Gram(n)
    for _, _, _, chunk in stream.chunks():
        acc.add(chunk)
    g = acc.matrix()
    for i in range(n):
        if not math.isfinite(g[i][i]):
            raise NonFiniteError(f"model_stock: delta {i + 1} has NaN or Inf values")
    return {"ratio": float(stock_ratio_of_gram(g, negative_cos))}


@merge_method(name="model_stock", inputs="deltas", elementwise=True, prepare=_ratio, provides=("ratio",))
def model_stock(base: torch.Tensor, deltas: list[torch.Tensor], *, filter_wise: bool = False,
                negative_cos: NegativeCos = "clamp", ratio: Any) -> torch.Tensor:
    """``base + t · mean(deltas)`` with Model Stock's angle-based ratio ``t``, chunk by chunk.

    Args:
        base: a chunk of the base.
        deltas: the same chunk of two or more deltas.
        filter_wise: one ratio per row (output filter) instead of one per tensor.
        negative_cos: clamp: a negative mean cosine is taken as 0, the base (paper); extrapolate: kept,
            a negative ratio (mergekit).
        ratio: ``t`` for this tensor, or for each entry of the chunk (from the prepare pass).

    Returns:
        The merged chunk.
    """
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    return mean.mul_(ratio).div_(len(deltas)).add_(base)
