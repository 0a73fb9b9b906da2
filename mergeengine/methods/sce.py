"""SCE (Wan et al. 2024, FuseChat, arXiv 2408.07990): Select, Calculate, Erase, per tensor.

1. **Select**: keep the entries whose variance across the inputs' deltas is among the top
   ``select_topk`` fraction of the entries with non-zero variance (``k = round(select_topk × count)``,
   ties by position); the others are zeroed in every delta. ``select_topk: 1`` keeps all.
2. **Calculate**: ``η_i = mean(D_i²) / Σ_j mean(D_j²)`` over the selected deltas (equal when all
   are zero).
3. **Erase**: elect ``sign(Σ D_i)`` per entry; ``sce = base + Σ η_i D_i [agree_i] / Σ η_i [agree_i]``
   over the deltas whose sign agrees (0 where none does). A sum of exactly 0 elects 0
   (``zero_vote: zero``) or + (``zero_vote: positive``, mergekit).

The engine streams it: passes over the tensor's chunks count the non-zero variances, select the
k-th largest (two histogram passes, :func:`~mergeengine.kernels.select_exact.select_abs_ranks_streamed_many`)
and sum the selected squares, then the merge runs chunk by chunk; no input is held whole in
float32 and the variance is recomputed per chunk rather than stored.

```yaml
- {id: m, op: merge, method: sce, base: base, inputs: [d_math, d_code], select_topk: 0.5}
```
"""

from __future__ import annotations

from typing import Any

import torch

from mergeengine.kernels.select_exact import (
    ChunkedTopk,
    RankSelection,
    keep_count,
    select_abs_ranks_streamed_many,
)
from mergeengine.kernels.ties import ZeroVote
from mergeengine.methods import Fraction, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._reduce import Gram
from mergeengine.methods._ties import elect_and_merge


class Variance:
    """Population variance across the deltas of one chunk (two passes over it: the mean, then the
    squared deviations), in scratch of the stream's chunk length, valid until the next call."""

    def __init__(self, stream: Any) -> None:
        self.mean, self.centred, self.out = stream.buffer(), stream.buffer(), stream.buffer()

    def __call__(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        n = deltas[0].numel()
        m, c, v = self.mean[:n].zero_(), self.centred[:n], self.out[:n].zero_()
        for d in deltas:
            m.add_(d)
        m.div_(len(deltas))
        for d in deltas:
            torch.sub(d, m, out=c)
            v.addcmul_(c, c)
        return v


class Selection:
    """The top ``select_topk`` entries by variance of one tensor, applied to its chunks in order.

    The rank is selected on the variance streamed chunk by chunk (never held whole); each
    :meth:`restart` gives a fresh pass with the same tie rule (the first tied entries in flat
    order are kept), as :func:`~mergeengine.kernels.select_exact.topk_abs_mask` on the whole tensor.
    """

    def __init__(self, stream: Any, select_topk: float) -> None:
        self.variance = Variance(stream)
        count = 0
        for _, _, _, chunk in stream.chunks():
            require_finite("sce", labelled(chunk, kind="delta"))
            count += int(torch.count_nonzero(self.variance(chunk)))
        self.numel, self.k = stream.numel, keep_count(count, select_topk)
        self.rank = RankSelection(0, 0, 0)
        if 0 < self.k < self.numel:
            def chunks() -> Any:
                return ((self.variance(chunk),) for _, _, _, chunk in stream.chunks())
            self.rank = select_abs_ranks_streamed_many(chunks, self.numel, [[self.numel - self.k + 1]])[0][0]
        self.restart()

    def restart(self) -> None:
        """Start a new pass over the chunks."""
        self.topk = ChunkedTopk(None, self.k, numel=self.numel, selection=self.rank)

    def mask(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Bool mask of the next chunk's selected entries."""
        return self.topk.mask(self.variance(deltas))


def _prepare(stream: Any, *, select_topk: float, **_: Any) -> dict[str, Any]:
    """Per tensor, before the merge pass: the selection (``select_topk < 1``) and the weights
    ``η_i``, from ``mean(D_i²)`` over the selected entries (equal when every selected delta is zero)."""
    selection = Selection(stream, select_topk) if select_topk < 1.0 else None
    squares = [Gram(1) for _ in stream.inputs]
    for _, _, _, chunk in stream.chunks():
        if selection is None:
            require_finite("sce", labelled(chunk, kind="delta"))
            taken = chunk
        else:
            keep = selection.mask(chunk)
            taken = [d.masked_fill_(keep.logical_not(), 0.0) for d in chunk]
        for acc, d in zip(squares, taken, strict=True):
            acc.add([d])
    totals = [acc.matrix()[0][0] for acc in squares]
    total = sum(totals)
    eta = [1.0 / len(totals)] * len(totals) if total == 0 else [sq / total for sq in totals]
    if selection is not None:
        selection.restart()
    return {"eta": eta, "selection": selection}


@merge_method(name="sce", inputs="deltas", elementwise=True, prepare=_prepare, provides=("eta", "selection"))
def sce(base: torch.Tensor, deltas: list[torch.Tensor], *, select_topk: Fraction = 1.0,
        int8_mask: bool = False, zero_vote: ZeroVote = "zero", eta: list[float],
        selection: Selection | None) -> torch.Tensor:
    """Select by variance, calculate weights by squared magnitude, erase minority signs, chunk by chunk.

    Args:
        base: a chunk of the base.
        deltas: the same chunk of the deltas.
        select_topk: fraction of entries (by variance across inputs) kept, in [0, 1].
        int8_mask: accepted for mergekit configs; no effect.
        zero_vote: What a vote of exactly 0 elects: zero (nothing agrees), or positive (mergekit).
        eta: the deltas' weights for this tensor (from the prepare pass).
        selection: the tensor's variance selection (None: ``select_topk: 1``, all kept).

    Returns:
        The merged chunk.
    """
    keep = selection.mask(deltas) if selection is not None else None
    return elect_and_merge(base, deltas, eta, keep=keep, zero_vote=zero_vote)
