"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

```yaml
- id: merged
  op: merge
  method: ties
  base: base
  inputs: [d_math, d_code]
  density: 0.2            # one value, or one per input
  trim_scope: tensor      # tensor | model (the paper: one threshold per model, a statistics pass)
  vote: unweighted        # unweighted (paper) | weighted (mergekit)
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from mergeengine.kernels.quantile import MagnitudeQuantile
from mergeengine.kernels.selection import (
    bits_to_float,
    float_to_bits,
    keep_count,
    sample_float32,
    samples_help,
    top_k_streamed,
)
from mergeengine.kernels.ties import ZeroVote, ties_merge_into
from mergeengine.ops import register_method
from mergeengine.ops.base import Reduction, TaskContext
from mergeengine.ops.merge import (
    KEEP_COUNT_DEFAULT,
    KEEP_COUNT_HELP,
    ChunkedResult,
    Density,
    KeepCount,
    MergeOp,
    MergeStep,
    per_input,
)
from mergeengine.ops.vocab import pad_rows
from mergeengine.runtime import numpy_threads


def keep_at_least(threshold: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model-wide trim: ``chunk.masked_fill_(chunk.abs() < threshold, 0.0)`` as one fused op.

    ``threshold`` is a float32 value (:meth:`MagnitudeQuantile.stage2_reduce`). Keeping
    ``|x| >= t`` is keeping ``|x| > t'``, ``t'`` the float32 just below ``t``: a ``hardshrink``,
    which also keeps NaN and writes +0.0, as the masked fill does. A threshold of 0 (or NaN:
    nothing compares below it) keeps everything. The bool compare and masked fill cost ~2.5 ns per
    entry here, the hardshrink ~0.15.
    """
    if not threshold > 0:
        return lambda chunk, bits, drop: chunk
    lambd = bits_to_float(float_to_bits(threshold) - 1)
    return lambda chunk, bits, drop: torch.hardshrink(chunk, lambd, out=chunk)


class NonNegativeWeights(BaseModel):
    """Sign election is undefined for negative weights."""

    @model_validator(mode="after")
    def _non_negative(self) -> Any:
        weights = getattr(self, "weights", None)
        if weights and any(w < 0 for w in weights):
            raise ValueError("weights must be >= 0 for sign election (use task_arithmetic to subtract a delta)")
        return self


class TiesStep(MergeStep, NonNegativeWeights):
    """TIES parameters."""

    method: Literal["ties"]
    density: Density | list[Density] = Field(description="Keep fraction of each delta (top-k by magnitude).")
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor", description="tensor: top-k per tensor (mergekit); model: one threshold per input model (paper)."
    )
    vote: Literal["unweighted", "weighted"] = Field(
        "unweighted", description="unweighted: sign(sum D_i) (paper); weighted: sign(sum w_i D_i) (mergekit)."
    )
    normalize: bool = Field(True, description="Divide by the agreeing weights (disjoint mean); false: their sum.")
    zero_vote: ZeroVote = Field("zero", description="What a vote of exactly 0 elects: zero, or positive (mergekit).")
    keep_count: KeepCount = Field(KEEP_COUNT_DEFAULT, description=KEEP_COUNT_HELP)


@register_method
class Ties(MergeOp):
    """Per tensor: trim each delta, then :func:`~mergeengine.kernels.ties.ties_merge`."""

    compute_bound = True
    method = "ties"
    Step = TiesStep
    step: TiesStep

    def _deltas(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        base = inputs[0].float()
        return [x.float() - base if self.input_kinds.get(s) == "model" else x.float()
                for s, x in zip(self.step.inputs, inputs[1:], strict=True)]

    def reductions(self) -> list[Reduction]:
        if self.step.trim_scope != "model":
            return []
        quantiles = [MagnitudeQuantile(d) for d in per_input(self.step.density, len(self.step.inputs))]
        names = list(self.metas)

        def fold(acc: Any, name: str, partial: list[torch.Tensor]) -> list[torch.Tensor]:
            return partial if not acc else [a + p for a, p in zip(acc, partial, strict=True)]

        def map1(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> list[torch.Tensor]:
            return [q.stage1_partial(d) for q, d in zip(quantiles, self._deltas(inputs), strict=True)]

        def finish1(acc: list[torch.Tensor], stats: Mapping[str, Any]) -> list[Any]:
            return [q.stage1_reduce(h) for q, h in zip(quantiles, acc, strict=True)]

        def map2(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> list[torch.Tensor]:
            states = stats["trim_high"]
            return [q.stage2_partial(d, s) for q, d, s in zip(quantiles, self._deltas(inputs), states, strict=True)]

        def finish2(acc: list[torch.Tensor], stats: Mapping[str, Any]) -> list[float]:
            return [q.stage2_reduce(h, s) for q, h, s in zip(quantiles, acc, stats["trim_high"], strict=True)]

        return [
            Reduction("trim_high", names, map1, finish1, fold=fold, label="magnitude histogram"),
            Reduction("trim_low", names, map2, finish2, fold=fold, after=["trim_high"], label="magnitude threshold"),
        ]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        """Stream: no float32 copy of any whole delta is ever made.

        The deltas are recomputed chunk by chunk (``model - base`` in cache-sized scratch, every
        input over one slice of the base at a time): once for their exact top-k thresholds (a
        sample predicts a window around each; see :func:`~mergeengine.kernels.selection.top_k_streamed`,
        which takes two histogram passes instead when a threshold falls outside its window), once
        more to trim, elect and average. Memory is a few chunks whatever the tensor size.
        """
        rows = self.target_rows.get(ctx.tensor)
        if rows is not None:
            inputs = [pad_rows(t, rows) for t in inputs]
        base = inputs[0].reshape(-1)
        xs = [t.reshape(-1) for t in inputs[1:]]
        is_model = [self.input_kinds.get(s) == "model" for s in self.step.inputs]
        numel = base.numel()
        result = ChunkedResult(numel, self.emit_dtype, base.device, scratch=1 + len(xs))

        def delta(i: int, start: int, end: int, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            d.copy_(xs[i][start:end])
            return d.sub_(b) if is_model[i] else d

        if self.step.trim_scope == "model":
            trims = [keep_at_least(t) for t in ctx.stats["trim_low"]]
        else:
            keeps = [keep_count(numel, p, self.step.keep_count) for p in per_input(self.step.density, len(xs))]

            def chunks() -> Iterator[list[torch.Tensor]]:  # |delta| of every input over one slice of the base
                for start, end, (b, *ds) in result.chunks():
                    b.copy_(base[start:end])
                    yield [delta(i, start, end, b, ds[i]).abs_() for i in range(len(xs))]

            samples = None
            with numpy_threads():  # the selection is mostly numpy: torch's second thread would only spin
                if base.device.type == "cpu" and samples_help(numel):  # a sample predicts each threshold: one pass
                    base_sample = sample_float32(base)
                    samples = [sample_float32(x) - base_sample if model else sample_float32(x)
                               for x, model in zip(xs, is_model, strict=True)]
                trims = [chooser.trim_ for chooser in top_k_streamed(chunks, numel, keeps, samples, magnitudes=True)]
        bits, drop = result.buffer(torch.int32), result.buffer(torch.bool)
        acc, sign, denominator = result.buffer(), result.buffer(), result.buffer()
        for start, end, (b, *ds) in result.chunks():
            n = end - start
            b.copy_(base[start:end])
            trimmed = [trim(delta(i, start, end, b, ds[i]), bits[:n], drop[:n]) for i, trim in enumerate(trims)]
            merged = ties_merge_into(trimmed, self.weights, acc[:n], [sign[:n], denominator[:n]], self.step.vote,
                                     self.step.normalize, self.step.zero_vote)
            result.put(start, end, torch.add(b, merged, alpha=self.step.lambda_, out=merged))
        return result.finish(inputs[0].shape, ctx)

    def report(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The model-wide thresholds (``trim_scope: model``)."""
        return {"op": "merge", "method": "ties", "thresholds": dict(zip(self.step.inputs, stats.get("trim_low", []),
                                                                          strict=False))}
