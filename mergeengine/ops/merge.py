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
from typing import Any

import torch

from mergeengine.errors import ShapeError
from mergeengine.methods import MergeStep, get_method
from mergeengine.ops import register
from mergeengine.ops.base import Op, Reduction, StepKind, TaskContext, TensorMeta, same_tensors
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
        self.method = step.method
        self.params = step.parameters()
        self.input_kinds: dict[str, str] = {}
        self.target_rows: dict[str, int] = {}
        self.read_from: dict[str, str] = {}
        self.fused: dict[str, Op] = {}
        self.emit_dtype = torch.float32

    @property
    def compute_bound(self) -> bool:  # type: ignore[override]
        """The method's own flag; amplifying chunks (fused DPA) makes any merge compute-bound."""
        return self.merge_method.compute_bound or bool(self.fused)

    @property
    def uses_base(self) -> bool:
        """Whether the base's tensors are read (a ``base: none`` method only takes its config)."""
        return self.step.base is not None and self.merge_method.base != "none"

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
        self.input_kinds = {i: kinds[i].kind for i in self.step.inputs if i in kinds}
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

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        ids = ([self.step.base] if self.uses_base else []) + self.step.inputs
        named = list({s: inputs[s] for s in ids}.items())
        self.target_rows = {}
        if self.step.vocab != "error":
            named = self._align_rows(named)
        try:
            return same_tensors(self.step.id, named)
        except ShapeError as exc:
            raise ShapeError(exc.message, step=self.step.id) from None

    def _align_rows(self, named: list[tuple[str, dict[str, TensorMeta]]]) -> list[tuple[str, dict[str, TensorMeta]]]:
        ref = named[0][1]
        for name, meta in ref.items():
            rows = [m[name].shape[0] for _, m in named if name in m and len(m[name].shape) == len(meta.shape)]
            if len(set(rows)) > 1 and is_vocab_tensor(name) and all(
                m[name].shape[1:] == meta.shape[1:] for _, m in named if name in m
            ):
                self.target_rows[name] = min(rows) if self.step.vocab == "truncate" else max(rows)
                if self.uses_base and self.step.vocab == "truncate":
                    self.target_rows[name] = ref[name].shape[0]
        if not self.target_rows:
            return named
        return [(sid, {n: TensorMeta((self.target_rows[n], *m.shape[1:]), m.dtype) if n in self.target_rows else m
                       for n, m in metas.items()}) for sid, metas in named]

    def emit_in(self, dtype: torch.dtype) -> dict[str, TensorMeta]:
        """Return floating-point results in ``dtype`` instead of float32; returns the new metas.

        The planner calls this when every consumer of the step is a save of that dtype: the
        float32 result is rounded once (same bytes as the save's own conversion) and no float32
        copy of the tensor is ever made.
        """
        if dtype.is_floating_point:
            self.emit_dtype = dtype
            self.metas = {n: TensorMeta(m.shape, dtype if m.dtype.is_floating_point else m.dtype)
                          for n, m in self.metas.items()}
        return self.metas

    def fuse_diffs(self, ops: Mapping[str, Op]) -> list[str]:
        """Read fine-tuned models directly where an input is a plain ``diff`` against this base.

        ``f(model - base)`` needs no materialised float32 delta: the subtraction happens inside the
        merge's chunks (bit-identical), and a models method reads the model it would restore. The
        diff step then only runs if another step uses it. Returns the fused input ids.
        """
        self.read_from = {}
        if not self.uses_base or self.step.vocab != "error":
            return []
        for i in self.step.inputs:
            op = ops.get(i)
            if op is not None and op.name == "diff" and op.step.base == self.step.base and op.step.vocab == "error":
                self.read_from[i] = op.step.model
                self.input_kinds[i] = "model"
        return list(self.read_from)

    def fuse_deltas(self, ops: Mapping[str, Op], users: Mapping[str, list[str]]) -> list[str]:
        """Amplify inputs chunk by chunk instead of reading materialised amplified deltas.

        For an element-wise deltas method: an input that is a ``dpa_amplify`` step (DP selection,
        on a plain diff against this merge's base) used by nothing else is computed here: the merge
        reads that step's fine-tuned model, selects the partition thresholds of each tensor (from
        the statistics the step's passes leave in ``TaskContext.stats_of``) and scales each chunk
        as it goes. The float32 amplified delta is never built, written or read back; the bytes
        are the same. Returns the fused input ids.
        """
        self.fused = {}
        method = self.merge_method
        if (not method.elementwise or method.prepare is not None or method.inputs != "deltas"
                or not self.uses_base or self.step.vocab != "error"):
            return []
        for i in self.step.inputs:
            op = ops.get(i)
            fusable = getattr(op, "fusable_into_merge", None)
            if (fusable is not None and fusable() and users.get(i) == [self.step.id]
                    and op.read_from[1] == self.step.base and i not in self.read_from):  # type: ignore[union-attr]
                self.fused[i] = op  # type: ignore[assignment]
                self.read_from[i] = op.read_from[0]  # type: ignore[union-attr]  # sources() reads the model
        return list(self.fused)

    def stats_steps(self) -> list[str]:
        return list(self.fused)

    def plan_notes(self) -> list[str]:
        notes = []
        if self.read_from:
            pairs = ", ".join(f"{m} (for {i})" for i, m in self.read_from.items() if i not in self.fused)
            if pairs:
                notes.append(f"reads {pairs} directly: the subtraction is fused into the merge")
        if self.fused:
            notes.append(f"amplifies {', '.join(self.fused)} chunk by chunk: no amplified delta is stored")
        return notes

    def sources(self, name: str) -> list[tuple[str, str]]:
        base = [(self.step.base, name)] if self.uses_base else []
        return base + [(self.read_from.get(i, i), name) for i in self.step.inputs]  # type: ignore[list-item]

    def reductions(self) -> list[Reduction]:
        statistics = self.merge_method.statistics
        if statistics is None:
            return []
        out = []
        for red in statistics(self.params, list(self.metas)):
            out.append(Reduction(red.name, red.tensors, self._whole_map(red.map), red.finish, fold=red.fold,
                                 after=red.after, label=red.label))
        return out

    def _whole_map(self, map_: Any) -> Any:
        """A reduction's map fed with the method's inputs of one tensor (whole float32 tensors)."""
        def wrapped(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> Any:
            return map_(name, self._stream(name, inputs, None).whole()[1], stats)
        return wrapped

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        stream = self._stream(ctx.tensor, inputs, ctx)
        rows = self.target_rows.get(ctx.tensor)
        shape = (rows, *inputs[0].shape[1:]) if rows is not None else inputs[0].shape
        return run_method(self.merge_method, self.params, stream, self.emit_dtype, shape)

    def _stream(self, tensor: str, inputs: list[torch.Tensor], ctx: TaskContext | None) -> TensorStream:
        rows = self.target_rows.get(tensor)
        if rows is not None:
            inputs = [pad_rows(t, rows) for t in inputs]
        base = inputs[0] if self.uses_base else None
        xs = inputs[1:] if self.uses_base else inputs
        conversions: list[Conversion] = [self._conversion(i) for i in self.step.inputs]
        fills = {k: self.fused[s].chunk_amplifier(xs[k], base, tensor, ctx.stats_of[s])  # type: ignore[attr-defined, union-attr]
                 for k, s in enumerate(self.step.inputs) if s in self.fused}
        return TensorStream(base.reshape(-1) if base is not None else None, [x.reshape(-1) for x in xs],
                            conversions, fills, ctx, tuple(inputs[0].shape))  # type: ignore[arg-type]

    def _conversion(self, step: str) -> Conversion:
        kind = self.input_kinds.get(step)
        if step in self.fused:
            return "fused"
        if self.merge_method.inputs == "deltas" and kind == "model":
            return "sub_base"
        if self.merge_method.inputs == "models" and kind == "delta":
            return "add_base"
        return "as_is"

    def report(self, stats: dict[str, Any]) -> dict[str, Any] | None:
        """The method's entry of ``dppa_report.json`` (None: the method reports nothing)."""
        report = self.merge_method.report
        return report(self.step, stats) if report is not None else None
