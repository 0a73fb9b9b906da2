"""Model Stock (Jang et al. 2024, arXiv 2403.19522): move from the base towards the average of
N >= 2 fine-tunes by a ratio set by the angle between their deltas.

Per tensor (or per row with ``filter_wise: true``; a 1-D tensor is one row), with ``cos θ`` the
mean over pairs ``i < j`` of ``<D_i, D_j> / max(|D_i| |D_j|, 1e-6)``::

    t = N cos θ / (1 + (N − 1) cos θ)        model_stock = base + t · (Σ D_i / N)

The paper's ratio assumes ``cos θ >= 0`` (fine-tunes of one base); a negative mean cosine is
taken as 0 (the base: nothing the fine-tunes agree on), where mergekit extrapolates with a
negative ``t`` (keeping the base only at the singular ``cos θ = −1/(N − 1)``).

```yaml
- {id: m, op: merge, method: model_stock, base: base, inputs: [math, code], filter_wise: false}
```
"""

from __future__ import annotations

import torch

from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_at_least, labelled, require_finite
from mergeengine.methods._reduce import gram, row_dots

NORM_PRODUCT_FLOOR = 1e-6


def _row_gram(rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``<D_i, D_j>`` per row (float64 ``[rows]``); one pass over the deltas when there is one row."""
    if rows[0].shape[0] == 1:
        return [[torch.tensor([v], dtype=torch.float64) for v in line] for line in gram(rows)]
    return [[row_dots(a, b) for b in rows] for a in rows]


def stock_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """``t`` per row of the 2-D ``deltas`` (float64, shape ``[rows, 1]``)."""
    g = _row_gram(deltas)
    pairs = [(i, j) for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    cos = sum((g[i][j] / (g[i][i].sqrt() * g[j][j].sqrt()).clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1)
              for i, j in pairs) / len(pairs)
    cos = cos.clamp(min=0.0)
    n = len(deltas)
    return (n * cos / (1 + (n - 1) * cos)).reshape(-1, 1)


@merge_method(name="model_stock", inputs="deltas")
def model_stock(base: torch.Tensor, deltas: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """``base + t · mean(deltas)`` with Model Stock's angle-based ratio ``t``.

    Args:
        base: the base's tensor.
        deltas: two or more deltas.
        filter_wise: one ratio per row (output filter) instead of one per tensor.

    Returns:
        The merged tensor.
    """
    expect_at_least("model_stock", deltas, 2)
    require_finite("model_stock", labelled(deltas, kind="delta"))
    rows = [d.reshape(-1, d.shape[-1]) if filter_wise and d.dim() > 1 else d.reshape(1, -1) for d in deltas]
    t = stock_ratio(rows).float()
    mean = torch.zeros_like(rows[0])
    for d in rows:
        mean.add_(d)
    mean.mul_(t / len(rows))
    return mean.view(base.shape).add_(base)
