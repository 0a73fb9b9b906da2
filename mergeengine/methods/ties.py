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
Each tensor's deltas are streamed twice in cache-sized chunks: once for their exact top-k
thresholds (a sample predicts a window around each, see
:func:`~mergeengine.kernels.select_sampled.top_k_streamed`), once to trim, elect and average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from mergeengine.kernels.quantile import MagnitudeQuantile
from mergeengine.kernels.select_exact import KeepCount, bits_to_float, float_to_bits
from mergeengine.kernels.select_exact import keep_count as count_kept
from mergeengine.kernels.select_sampled import top_k_streamed
from mergeengine.kernels.ties import ZeroVote, ties_merge, ties_merge_into
from mergeengine.methods import Density, MergeStep, PerInput, merge_method
from mergeengine.ops.base import Reduction
from mergeengine.ops.chunks import TensorStream
from mergeengine.runtime import numpy_threads

Vote = Literal["unweighted", "weighted"]
Trim = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def non_negative_weights(params: Mapping[str, Any]) -> None:
    """Sign election is undefined for negative weights."""
    if any(w < 0 for w in params["weights"]):
        raise ValueError("weights must be >= 0 for sign election (use task_arithmetic to subtract a delta)")


def keep_at_least(threshold: float) -> Trim:
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


def _trims(stream: TensorStream, *, density: list[float], trim_scope: str, keep_count: KeepCount = "round",
           **_: Any) -> dict[str, Any]:
    """Each input's trim for this tensor (its exact top-k, or the model-wide threshold) and scratch."""
    if trim_scope == "model":
        trims = [keep_at_least(t) for t in stream.stats["trim_low"]]
    else:
        keeps = [count_kept(stream.numel, p, keep_count) for p in density]

        def magnitudes() -> Any:  # |delta| of every input over one slice of the base
            return ([d.abs_() for d in ds] for _, _, _, ds in stream.chunks())

        with numpy_threads():  # the selection is mostly numpy: torch's second thread would only spin
            choosers = top_k_streamed(magnitudes, stream.numel, keeps, stream.samples(), magnitudes=True)
            trims = [chooser.trim_ for chooser in choosers]
    scratch = [stream.buffer(torch.int32), stream.buffer(torch.bool), stream.buffer(), stream.buffer(), stream.buffer()]
    return {"trims": trims, "scratch": scratch}


def _model_thresholds(params: Mapping[str, Any], tensors: list[str]) -> list[Reduction]:
    """``trim_scope: model``: one magnitude threshold per input over every tensor (two passes)."""
    if params["trim_scope"] != "model":
        return []
    quantiles = [MagnitudeQuantile(d) for d in params["density"]]

    def fold(acc: Any, name: str, partial: list[torch.Tensor]) -> list[torch.Tensor]:
        return partial if not acc else [a + p for a, p in zip(acc, partial, strict=True)]

    def map1(name: str, deltas: list[torch.Tensor], stats: Mapping[str, Any]) -> list[torch.Tensor]:
        return [q.stage1_partial(d) for q, d in zip(quantiles, deltas, strict=True)]

    def finish1(acc: list[torch.Tensor], stats: Mapping[str, Any]) -> list[Any]:
        return [q.stage1_reduce(h) for q, h in zip(quantiles, acc, strict=True)]

    def map2(name: str, deltas: list[torch.Tensor], stats: Mapping[str, Any]) -> list[torch.Tensor]:
        return [q.stage2_partial(d, s) for q, d, s in zip(quantiles, deltas, stats["trim_high"], strict=True)]

    def finish2(acc: list[torch.Tensor], stats: Mapping[str, Any]) -> list[float]:
        return [q.stage2_reduce(h, s) for q, h, s in zip(quantiles, acc, stats["trim_high"], strict=True)]

    return [
        Reduction("trim_high", tensors, map1, finish1, fold=fold, label="magnitude histogram"),
        Reduction("trim_low", tensors, map2, finish2, fold=fold, after=["trim_high"], label="magnitude threshold"),
    ]


def _report(step: MergeStep, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The model-wide thresholds (``trim_scope: model``)."""
    return {"op": "merge", "method": "ties", "thresholds": dict(zip(step.inputs, stats.get("trim_low", []),
                                                                      strict=False))}


@merge_method(name="ties", inputs="deltas", elementwise=True, compute_bound=True, validate=non_negative_weights,
              prepare=_trims, provides=("trims", "scratch"), statistics=_model_thresholds, report=_report)
def ties(base: torch.Tensor, deltas: list[torch.Tensor], *, density: PerInput[Density],
         trim_scope: Literal["tensor", "model"] = "tensor", vote: Vote = "unweighted",
         weights: PerInput[float] = 1.0, lambda_: float = 1.0, normalize: bool = True, int8_mask: bool = False,
         zero_vote: ZeroVote = "zero", keep_count: KeepCount = "round",
         trims: list[Trim], scratch: list[torch.Tensor]) -> torch.Tensor:
    """Trim each delta to its top ``density``, elect the sign, average the agreeing entries.

    Args:
        density: Keep fraction of each delta (top-k by magnitude; one value, or one per input).
        trim_scope: tensor: top-k per tensor (mergekit); model: one threshold per input model (paper).
        vote: unweighted: sign(sum D_i) (paper); weighted: sign(sum w_i D_i) (mergekit).
        weights: One weight per input (default 1 each; >= 0).
        lambda_: Scale of the merged delta added to the base.
        normalize: true: divide by the summed weights of the agreeing inputs (paper); false: do not (mergekit's normalize: false).
        int8_mask: Accepted for mergekit configs; no effect (masks are never materialised at model scale).
        zero_vote: What a vote of exactly 0 elects: zero (nothing agrees), or positive (mergekit).
        keep_count: round: k = round(density * n); truncate: int(density * n), mergekit's count.
    """
    n = base.numel()
    bits, drop, acc, sign, denominator = (s[:n] for s in scratch)
    trimmed = [trim(d, bits, drop) for trim, d in zip(trims, deltas, strict=True)]
    if not normalize:
        return base.add(ties_merge(trimmed, weights, vote, normalize=False, zero_vote=zero_vote), alpha=lambda_)
    merged = ties_merge_into(trimmed, weights, acc, [sign, denominator], vote, zero_vote=zero_vote)
    return torch.add(base, merged, alpha=lambda_, out=merged)
