"""SCE (Wan et al. 2024, FuseChat, arXiv 2408.07990): Select, Calculate, Erase, per tensor.

1. **Select**: keep the entries whose variance across the inputs' deltas is among the top
   ``select_topk`` fraction of the entries with non-zero variance (``k = round(select_topk × count)``,
   ties by position); the others are zeroed in every delta. ``select_topk: 1`` keeps all.
2. **Calculate**: ``η_i = mean(D_i²) / Σ_j mean(D_j²)`` over the selected deltas (equal when all
   are zero).
3. **Erase**: elect ``sign(Σ D_i)`` per entry; ``sce = base + Σ η_i D_i [agree_i] / Σ η_i [agree_i]``
   over the deltas whose sign agrees (0 where none does).

```yaml
- {id: m, op: merge, method: sce, base: base, inputs: [d_math, d_code], select_topk: 0.5}
```
"""

from __future__ import annotations

import torch

from mergeengine.kernels.chunking import spans
from mergeengine.kernels.select_exact import keep_count, topk_abs_mask
from mergeengine.methods import Fraction, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._reduce import CHUNK, dot
from mergeengine.methods._ties import elect_and_merge


def variance_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Bool mask of the top ``select_topk`` fraction of the entries by variance across the deltas
    (population variance, two passes per chunk: the mean, then the squared deviations)."""
    flat = [d.reshape(-1) for d in deltas]
    variance = torch.empty_like(flat[0])
    mean, centred = (torch.empty(min(CHUNK, max(variance.numel(), 1)), device=variance.device) for _ in range(2))
    for s, e in spans(variance.numel(), CHUNK):
        m, c, v = mean[: e - s].zero_(), centred[: e - s], variance[s:e].zero_()
        for d in flat:
            m.add_(d[s:e])
        m.div_(len(flat))
        for d in flat:
            torch.sub(d[s:e], m, out=c)
            v.addcmul_(c, c)
    k = keep_count(int(torch.count_nonzero(variance)), select_topk)
    return topk_abs_mask(variance, k).view(deltas[0].shape)


def square_weights(deltas: list[torch.Tensor], keep: torch.Tensor | None) -> list[float]:
    """``mean(D_i²)`` over the selected entries (the others count as 0), normalised to sum 1
    (equal weights when every selected delta is zero)."""
    if keep is None:
        squares = [dot(d, d) for d in deltas]
    else:
        squares = []
        for d in deltas:
            selected = torch.where(keep, d, 0.0)
            squares.append(dot(selected, selected))
    total = sum(squares)
    if total == 0:
        return [1.0 / len(deltas)] * len(deltas)
    return [sq / total for sq in squares]


@merge_method(name="sce", inputs="deltas")
def sce(base: torch.Tensor, deltas: list[torch.Tensor], *, select_topk: Fraction = 1.0,
        int8_mask: bool = False) -> torch.Tensor:
    """Select by variance, calculate weights by squared magnitude, erase minority signs.

    Args:
        base: the base's tensor.
        deltas: the deltas.
        select_topk: fraction of entries (by variance across inputs) kept, in [0, 1].
        int8_mask: accepted for mergekit configs; no effect.

    Returns:
        The merged tensor.
    """
    require_finite("sce", labelled(deltas, kind="delta"))
    keep = variance_mask(deltas, select_topk) if select_topk < 1.0 else None
    weights = square_weights(deltas, keep)
    if keep is None:
        keep = torch.ones(base.shape, dtype=torch.bool, device=base.device)  # read, never overwrite, the deltas
    return elect_and_merge(base, deltas, weights, keep=keep)
