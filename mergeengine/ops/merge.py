"""``merge``: combine deltas (or models) with a merge method (see :mod:`mergeengine.methods`).

```yaml
- id: merged
  op: merge
  method: task_arithmetic
  base: base
  inputs: [d_math, d_code]   # deltas; models are diffed against base automatically
  weights: [1.0, 0.5]
  lambda: 0.7
```
One op for every method: it checks kinds, aligns names, shapes and vocabularies, and hands each
tensor to the method through the chunked driver (:mod:`mergeengine.ops.chunks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from mergeengine.errors import ShapeError
from mergeengine.methods import MergeStep, get_method
from mergeengine.ops import register
from mergeengine.ops.base import (
    Op,
    PlanInputs,
    Reduction,
    StepKind,
    StepPlan,
    TaskContext,
    TensorMeta,
    same_tensors,
)
from mergeengine.ops.chunks import Conversion, TensorStream, run_method
from mergeengine.ops.vocab import is_vocab_tensor, pad_rows


@register
class MergeOp(Op):
    """A merge step: the method's function, fed by the chunked driver."""

    name = "merge"
    Step = MergeStep
    step: MergeStep

    def __init__(self, step: MergeStep) -> None:
        super().__init__(step)
        self.merge_method = get_method(step.method)
        self.params = step.parameters()

    def with_params(self, values: Mapping[str, Any]) -> Op:
        """This merge for one tensor whose scheduled parameters take ``values`` (see :meth:`Op.with_params`)."""
        view = super().with_params(values)
        view.params = view.step.parameters()  # type: ignore[attr-defined]
        return view

    @property
    def label(self) -> str:
        return self.step.method

    @property
    def uses_base(self) -> bool:
        """Whether the base's tensors are read (a ``base: none`` method only takes its config)."""
        return self.step.base is not None and self.merge_method.base != "none"

    def is_compute_bound(self, plan: StepPlan) -> bool:
        """The method's own flag; amplifying chunks (fused DPA) makes any merge compute-bound."""
        return self.merge_method.compute_bound or bool(plan.fused)

    def references(self) -> dict[str, list[str]]:
        refs = {"inputs": list(self.step.inputs)}
        if self.step.base is not None:
            refs["base"] = [self.step.base]
        return refs

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        method, base = self.merge_method, self.step.base
        if base is None and method.base == "required":
            return None, [("base", f"method '{method.name}' needs a base model")]
        problems: list[tuple[str, str]] = []
        if base is not None and base in kinds and kinds[base].kind != "model":
            problems.append(("base", f"'{base}' is a {kinds[base].kind}; the base must be a model"))
        problems += [("inputs", p) for i in self.step.inputs if i in kinds and (p := self._input_problem(i, kinds[i]))]
        if problems:
            return None, problems
        origin_step = base if base is not None else self.step.inputs[0]
        if origin_step not in kinds:
            return None, []
        return StepKind("model", origin=kinds[origin_step].origin), []

    def _input_problem(self, step: str, kind: StepKind) -> str | None:
        method = self.merge_method
        if method.inputs == "models" and kind.kind == "delta" and (not self.uses_base or kind.base != self.step.base):
            return (f"'{step}' is a delta; method '{method.name}' merges models (give a model, or base: "
                    f"'{kind.base}' to add the delta back to it)")
        if method.inputs == "deltas" and kind.kind == "model" and not self.uses_base:
            return f"'{step}' is a model; method '{method.name}' needs a base to diff it against"
        return None

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """Names and shapes agree across base and inputs; vocabulary rows per ``vocab``."""
        ids = ([self.step.base] if self.uses_base else []) + self.step.inputs
        named = list({s: dict(inputs.metas[s]) for s in ids}.items())  # type: ignore[misc]
        rows = self._target_rows(named) if self.step.vocab != "error" else {}
        if rows:
            named = [(sid, {n: TensorMeta((rows[n], *m.shape[1:]), m.dtype) if n in rows else m
                            for n, m in metas.items()}) for sid, metas in named]
        try:
            metas = same_tensors(self.step.id, named)
        except ShapeError as exc:
            hint = ("; the vocabularies differ: set 'vocab: truncate' or 'vocab: pad_base' on this step"
                    if self.step.vocab == "error" and self._target_rows(named) else "")
            raise ShapeError(exc.message + hint, step=self.step.id) from None
        kinds = {i: inputs.kinds[i].kind for i in self.step.inputs}
        return StepPlan(metas, inputs.kinds[self.step.id], input_kinds=kinds, target_rows=rows)

    def _target_rows(self, named: list[tuple[str, dict[str, TensorMeta]]]) -> dict[str, int]:
        """Tensor -> the rows every input takes (vocabulary tensors whose row counts differ)."""
        ref, out = named[0][1], {}
        for name, meta in ref.items():
            rows = [m[name].shape[0] for _, m in named if name in m and len(m[name].shape) == len(meta.shape)]
            if len(set(rows)) > 1 and is_vocab_tensor(name) and all(
                m[name].shape[1:] == meta.shape[1:] for _, m in named if name in m
            ):
                out[name] = min(rows) if self.step.vocab == "truncate" else max(rows)
                if self.uses_base and self.step.vocab == "truncate":
                    out[name] = ref[name].shape[0]
        return out

    def emit_in(self, plan: StepPlan, dtype: torch.dtype) -> StepPlan:
        """Return floating-point results in ``dtype`` instead of float32.

        The planner asks when every consumer of the step is a save of that dtype: the float32
        result is rounded once (same bytes as the save's own conversion) and no float32 copy of
        the tensor is ever made.
        """
        if not dtype.is_floating_point:
            return plan
        metas = {n: TensorMeta(m.shape, dtype if m.dtype.is_floating_point else m.dtype) for n, m in plan.metas.items()}
        return replace(plan, metas=metas, emit_dtype=dtype)

    def fuse_diffs(self, plan: StepPlan, ops: Mapping[str, Op]) -> StepPlan:
        """Read fine-tuned models directly where an input is a plain ``diff`` against this base.

        ``f(model - base)`` needs no materialised float32 delta: the subtraction happens inside the
        merge's chunks (bit-identical), and a models method reads the model it would restore. The
        diff step then only runs if another step uses it.
        """
        if not self.uses_base or self.step.vocab != "error":
            return plan
        read_from = {i: (op.step.model,) for i in self.step.inputs
                     if (op := ops.get(i)) is not None and op.name == "diff" and op.step.base == self.step.base
                     and op.step.vocab == "error"}
        kinds = {**plan.input_kinds, **dict.fromkeys(read_from, "model")}
        return replace(plan, read_from=read_from, input_kinds=kinds)

    def fuse_deltas(self, plan: StepPlan, ops: Mapping[str, Op], plans: Mapping[str, StepPlan],
                    users: Mapping[str, list[str]]) -> StepPlan:
        """Amplify inputs chunk by chunk instead of reading materialised amplified deltas.

        For an element-wise deltas method: an input whose op is fusable into a merge (a
        ``dpa_amplify`` with DP selection on a plain diff against this merge's base) and used by
        nothing else is computed here: the merge reads that step's fine-tuned model, selects the
        partition thresholds of each tensor (from the statistics the step's passes leave in
        ``TaskContext.stats_of``) and scales each chunk as it goes. The float32 amplified delta is
        never built, written or read back; the bytes are the same.
        """
        method = self.merge_method
        if (not method.elementwise or method.prepare is not None or method.inputs != "deltas"
                or not self.uses_base or self.step.vocab != "error"):
            return plan
        fused = {i: ops[i] for i in self.step.inputs
                 if i in ops and ops[i].fusable_into_merge(plans[i]) and users.get(i) == [self.step.id]
                 and plans[i].read_from[ops[i].step.input][1] == self.step.base  # type: ignore[attr-defined]
                 and i not in plan.read_from}
        if not fused:
            return plan
        read_from = {**plan.read_from, **{i: plans[i].read_from[op.step.input][:1]  # type: ignore[attr-defined]
                                          for i, op in fused.items()}}
        amplifiers = {i: (op, plans[i]) for i, op in fused.items()}
        return replace(plan, read_from=read_from, fused=tuple(fused), details={**plan.details, "amplifiers": amplifiers})

    def plan_notes(self, plan: StepPlan) -> list[str]:
        notes = []
        pairs = ", ".join(f"{m[0]} (for {i})" for i, m in plan.read_from.items() if i not in plan.fused)
        if pairs:
            notes.append(f"reads {pairs} directly: the subtraction is fused into the merge")
        if plan.fused:
            notes.append(f"amplifies {', '.join(plan.fused)} chunk by chunk: no amplified delta is stored")
        return notes

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        base = [(self.step.base, name)] if self.uses_base else []
        return base + [(plan.read_from.get(i, (i,))[0], name) for i in self.step.inputs]  # type: ignore[list-item]

    def reductions(self, plan: StepPlan) -> list[Reduction]:
        statistics = self.merge_method.statistics
        if statistics is None:
            return []
        params = {tensor: self.for_tensor(plan, tensor).params for tensor in plan.params}  # type: ignore[attr-defined]
        return [Reduction(red.name, red.tensors, self._whole_map(plan, red.map), red.finish, fold=red.fold,
                          after=red.after, label=red.label)
                for red in statistics(lambda tensor: params.get(tensor, self.params), list(plan.metas))]

    def _whole_map(self, plan: StepPlan, map_: Any) -> Any:
        """A reduction's map fed with the method's inputs of one tensor (whole float32 tensors)."""
        def wrapped(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> Any:
            return map_(name, self._stream(plan, name, inputs, None).whole()[1], stats)
        return wrapped

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        stream = self._stream(ctx.plan, ctx.tensor, inputs, ctx)
        dtype = ctx.plan.emit_dtype or torch.float32
        return run_method(self.merge_method, self.params, stream, dtype, ctx.plan.metas[ctx.tensor].shape)

    def _stream(self, plan: StepPlan, tensor: str, inputs: list[torch.Tensor], ctx: TaskContext | None) -> TensorStream:
        rows = plan.target_rows.get(tensor)
        if rows is not None:
            inputs = [pad_rows(t, rows) for t in inputs]
        base = inputs[0] if self.uses_base else None
        xs = inputs[1:] if self.uses_base else inputs
        amplifiers = plan.details.get("amplifiers", {})
        fills = {k: op.chunk_amplifier(op_plan, xs[k], base, tensor, ctx.stats_of[s])  # type: ignore[union-attr]
                 for k, s in enumerate(self.step.inputs) if s in amplifiers for op, op_plan in [amplifiers[s]]}
        return TensorStream(base.reshape(-1) if base is not None else None, [x.reshape(-1) for x in xs],
                            [self._conversion(plan, i) for i in self.step.inputs], fills, ctx,  # type: ignore[arg-type]
                            tuple(inputs[0].shape))

    def _conversion(self, plan: StepPlan, step: str) -> Conversion:
        kind = plan.input_kinds.get(step)
        if step in plan.fused:
            return "fused"
        if self.merge_method.inputs == "deltas" and kind == "model":
            return "sub_base"
        if self.merge_method.inputs == "models" and kind == "delta":
            return "add_base"
        return "as_is"

    def report(self, plan: StepPlan, stats: dict[str, Any]) -> dict[str, Any] | None:
        """The method's entry of ``dppa_report.json`` (None: the method reports nothing)."""
        report = self.merge_method.report
        return report(self.step, stats) if report is not None else None
