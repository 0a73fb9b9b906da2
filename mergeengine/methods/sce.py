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

import torch

from mergeengine.kernels.selection import keep_count, topk_abs_mask
from mergeengine.methods import Fraction, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._reduce import dot
from mergeengine.methods._ties import elect_and_merge


def variance_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Bool mask of the top ``select_topk`` fraction of the entries by variance across the deltas."""
    mean = torch.zeros_like(deltas[0])
    for d in deltas:
        mean.add_(d)
    mean.div_(len(deltas))
    variance = torch.zeros_like(mean)
    for d in deltas:
        centred = d - mean
        variance.addcmul_(centred, centred)
    del mean
    k = keep_count(int(torch.count_nonzero(variance)), select_topk)
    return topk_abs_mask(variance, k)


def square_weights(deltas: list[torch.Tensor]) -> list[float]:
    """``mean(D_i²)`` normalised to sum 1 (equal weights when every delta is zero)."""
    squares = [dot(d, d) / max(d.numel(), 1) for d in deltas]
    total = sum(squares)
    if total == 0:
        return [1.0 / len(deltas)] * len(deltas)
    return [s / total for s in squares]


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
    if select_topk < 1.0:
        keep = variance_mask(deltas, select_topk)
        zero = torch.zeros((), dtype=base.dtype, device=base.device)
        deltas = [torch.where(keep, d, zero) for d in deltas]
    else:
        deltas = [d.clone() for d in deltas]  # the merge below overwrites its deltas
    return elect_and_merge(base, deltas, square_weights(deltas))
