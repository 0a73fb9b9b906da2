"""``merge``: combine deltas (or models) onto a base. One class per method, sharing this base.

```yaml
- id: merged
  op: merge
  method: task_arithmetic
  base: base
  inputs: [d_math, d_code]   # deltas; models are diffed against base automatically
  weights: [1.0, 0.5]
  lambda: 0.7
```
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from mergeengine.errors import ShapeError
from mergeengine.ops import register_method
from mergeengine.ops.base import Op, StepKind, StepModel, TaskContext, TensorMeta, same_tensors
from mergeengine.ops.vocab import VocabPolicy, is_vocab_tensor, pad_rows

Density = Annotated[float, Field(gt=0, le=1)]
# How a top-k fraction becomes a count: round to nearest, or truncate (mergekit's int(density * n)).
KeepCount = Literal["round", "truncate"]
KEEP_COUNT_DEFAULT = "round"
KEEP_COUNT_HELP = "round: k = round(density * n); truncate: int(density * n), mergekit's count."
# Elements per chunk of elementwise merge work: 512 KiB of float32, so the few float32
# temporaries of a chunk stay in a core's L2 cache (1M-element chunks ran 2-3x slower here).
CHUNK_NUMEL = 1 << 17  # a multiple of sparsify.SUM_BLOCK (DARE's l1 norms sum whole blocks)


class MergeStep(StepModel):
    """Fields every merge method has."""

    op: Literal["merge"]
    method: str
    base: str | None = Field(None, description="Step id of the base model (required except for linear).")
    inputs: list[str] = Field(min_length=1, description="Step ids of deltas or models to merge.")
    weights: list[float] | None = Field(None, description="One weight per input (default 1 each).")
    lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged delta added to the base.")
    vocab: VocabPolicy = Field(
        "error",
        description="When inputs have more embedding/lm_head rows than the base: error, "
        "truncate (to the base's rows) or pad_base (zero rows added, output takes the largest vocabulary).",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> MergeStep:
        if self.weights is not None and len(self.weights) != len(self.inputs):
            raise ValueError(f"weights has {len(self.weights)} entries but inputs has {len(self.inputs)}")
        for field in ("density", "gamma"):
            value = getattr(self, field, None)
            if isinstance(value, list) and len(value) != len(self.inputs):
                raise ValueError(f"{field} has {len(value)} entries but inputs has {len(self.inputs)}")
        return self


def merge_chunk() -> int:
    """The current chunk size (a function so tests can shrink :data:`CHUNK_NUMEL`)."""
    return CHUNK_NUMEL


class ChunkedResult:
    """The output of a chunked merge: written chunk by chunk in the stored dtype, checked as it goes.

    Each chunk's float32 result is rounded once into the output (the dtype the save step stores,
    see :meth:`MergeOp.emit_in`), and summed while it is still in cache: a finite total proves
    the tensor has no NaN/Inf, so the executor skips its own pass over the saved tensor.

    Args:
        numel: elements of the tensor.
        dtype: output dtype.
        device: where the math runs.
        scratch: number of chunk-sized float32 scratch buffers :meth:`chunks` hands out.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, scratch: int = 0) -> None:
        self.numel = numel
        self.out = torch.empty(numel, dtype=dtype, device=device)
        self._total = torch.zeros((), dtype=torch.float32, device=device)
        self._scratch = [self.buffer() for _ in range(scratch)]

    def buffer(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """A new scratch buffer of one chunk's length (slice it with ``[: end - start]``), on the
        output's device unless ``device`` says otherwise."""
        return torch.empty(min(merge_chunk(), max(self.numel, 1)), dtype=dtype, device=device or self.out.device)

    def chunks(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """``(start, end, scratch buffers sliced to the chunk)`` over the whole tensor, in order."""
        step = merge_chunk()
        for start in range(0, self.numel, step):
            end = min(start + step, self.numel)
            yield start, end, [b[: end - start] for b in self._scratch]

    def put(self, start: int, end: int, value: torch.Tensor) -> None:
        """Store the float32 result of one chunk."""
        dst = self.out[start:end]
        dst.copy_(value)
        self._total += torch.sum(dst, dtype=torch.float32)

    def finish(self, shape: torch.Size | tuple[int, ...], ctx: TaskContext) -> torch.Tensor:
        """The whole result, shaped; marks ``ctx.checked_finite`` when no NaN/Inf was seen."""
        if bool(torch.isfinite(self._total)):  # an overflowing sum only costs the executor's exact check
            ctx.checked_finite = True
        return self.out.view(shape)


def per_input(value: float | list[float], n: int) -> list[float]:
    """Broadcast a scalar parameter to one value per input."""
    return list(value) if isinstance(value, list) else [value] * n


class MergeOp(Op):
    """Shared behaviour: kind checks, name/shape alignment, models -> deltas, ``base + lambda * merged``.

    Subclasses implement :meth:`combine` on the list of float32 deltas of one tensor.
    """

    name = "merge"
    method: str
    step: MergeStep
    needs_base = True
    #: dtype results are returned in (see :meth:`emit_in`).
    emit_dtype: torch.dtype = torch.float32

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

    @property
    def weights(self) -> list[float]:
        return self.step.weights or [1.0] * len(self.step.inputs)

    def references(self) -> dict[str, list[str]]:
        refs = {"inputs": list(self.step.inputs)}
        if self.step.base is not None:
            refs["base"] = [self.step.base]
        return refs

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        problems: list[tuple[str, str]] = []
        base = self.step.base
        if base is None and self.needs_base:
            return None, [("base", f"method '{self.method}' needs a base model")]
        if base is not None and base in kinds and kinds[base].kind != "model":
            problems.append(("base", f"'{base}' is a {kinds[base].kind}; the base must be a model"))
        self.input_kinds = {i: kinds[i].kind for i in self.step.inputs if i in kinds}
        if problems:
            return None, problems
        origin_step = base if base is not None else self.step.inputs[0]
        if origin_step not in kinds:
            return None, []
        return StepKind("model", origin=kinds[origin_step].origin), []

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        named = [(s, inputs[s]) for s in ([self.step.base] if self.step.base else []) + self.step.inputs]
        named = list(dict(named).items())
        self.target_rows: dict[str, int] = {}
        if self.step.vocab != "error":
            named = self._align_rows(named)
        return same_tensors(self.step.id, named)

    def _align_rows(self, named: list[tuple[str, dict[str, TensorMeta]]]) -> list[tuple[str, dict[str, TensorMeta]]]:
        ref = named[0][1]
        for name, meta in ref.items():
            rows = [m[name].shape[0] for _, m in named if name in m and len(m[name].shape) == len(meta.shape)]
            if len(set(rows)) > 1 and is_vocab_tensor(name) and all(
                m[name].shape[1:] == meta.shape[1:] for _, m in named if name in m
            ):
                self.target_rows[name] = min(rows) if self.step.vocab == "truncate" else max(rows)
                if self.step.base and self.step.vocab == "truncate":
                    self.target_rows[name] = ref[name].shape[0]
        if not self.target_rows:
            return named
        out = []
        for sid, metas in named:
            fixed = {
                n: TensorMeta((self.target_rows[n], *m.shape[1:]), m.dtype) if n in self.target_rows else m
                for n, m in metas.items()
            }
            out.append((sid, fixed))
        return out

    read_from: dict[str, str] = {}

    def fuse_diffs(self, ops: Mapping[str, Op]) -> list[str]:
        """Read fine-tuned models directly where an input is a plain ``diff`` against this base.

        ``base + lambda * f(model - base)`` needs no materialised float32 delta: the subtraction
        happens inside the merge (bit-identical). The diff step then only runs if another step
        uses it. Returns the fused input ids.
        """
        self.read_from = {}
        if not self.needs_base or self.step.vocab != "error":
            return []
        for i in self.step.inputs:
            op = ops.get(i)
            if op is not None and op.name == "diff" and op.step.base == self.step.base and op.step.vocab == "error":
                self.read_from[i] = op.step.model
                self.input_kinds[i] = "model"
        return list(self.read_from)

    def plan_notes(self) -> list[str]:
        if not self.read_from:
            return []
        pairs = ", ".join(f"{m} (for {i})" for i, m in self.read_from.items())
        return [f"reads {pairs} directly: the subtraction is fused into the merge"]

    def sources(self, name: str) -> list[tuple[str, str]]:
        base = [(self.step.base, name)] if self.step.base and self.needs_base else []
        return base + [(self.read_from.get(i, i), name) for i in self.step.inputs]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        rows = self.target_rows.get(ctx.tensor)
        if rows is not None:
            inputs = [pad_rows(t, rows) for t in inputs]
        base = inputs[0].float()
        deltas = []
        for step_id, x in zip(self.step.inputs, inputs[1:], strict=True):
            deltas.append(x.float() - base if self.input_kinds.get(step_id) == "model" else x.float())
        merged = self.combine(deltas, ctx)
        out = base.add_(merged, alpha=self.step.lambda_) if base is not inputs[0] else base + self.step.lambda_ * merged
        return out.to(self.emit_dtype)

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        """Merge the float32 deltas of one tensor into one delta."""
        raise NotImplementedError


class TaskArithmeticStep(MergeStep):
    """``base + lambda * sum_i w_i delta_i``."""

    method: Literal["task_arithmetic"]


@register_method
class TaskArithmetic(MergeOp):
    """Task arithmetic (Ilharco et al. 2023)."""

    method = "task_arithmetic"
    Step = TaskArithmeticStep
    #: input id -> the delta op whose chunks this merge computes itself (see :meth:`fuse_deltas`)
    fused: dict[str, Op] = {}

    @property
    def compute_bound(self) -> bool:  # type: ignore[override]
        """Amplifying chunks (DPA's selection and scaling) makes the merge compute-bound."""
        return bool(self.fused)

    def fuse_deltas(self, ops: Mapping[str, Op], users: Mapping[str, list[str]]) -> list[str]:
        """Amplify inputs chunk by chunk instead of reading materialised amplified deltas.

        An input that is a ``dpa_amplify`` step (DP selection, on a plain diff against this
        merge's base) used by nothing else is computed here: the merge reads that step's
        fine-tuned model, selects the partition thresholds of each tensor (from the statistics
        the step's passes leave in ``TaskContext.stats_of``) and scales each chunk as it adds it.
        The float32 amplified delta (4 bytes per entry, fresh memory for every tensor) is never
        built, written or read back; the bytes are the same. Returns the fused input ids.
        """
        self.fused = {}
        if not self.needs_base or self.step.vocab != "error":
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
        notes = super().plan_notes()
        if self.fused:
            notes.append(f"amplifies {', '.join(self.fused)} chunk by chunk: no amplified delta is stored")
        return notes

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        """Chunk by chunk in reused float32 scratch: same bytes as the whole-tensor path."""
        if self.target_rows.get(ctx.tensor) is not None:
            return super().compute(inputs, ctx)
        flat = [t.reshape(-1) for t in inputs]
        is_model = [self.input_kinds.get(s) == "model" for s in self.step.inputs]
        fills = {k: self.fused[s].chunk_amplifier(inputs[k + 1], inputs[0], ctx.tensor, ctx.stats_of[s])  # type: ignore[attr-defined]
                 for k, s in enumerate(self.step.inputs) if s in self.fused}
        result = ChunkedResult(flat[0].numel(), self.emit_dtype, flat[0].device, scratch=4)
        for start, end, (base, acc, d, delta) in result.chunks():
            base.copy_(flat[0][start:end])
            for i, (w, x, model) in enumerate(zip(self.weights, flat[1:], is_model, strict=True)):
                dst = acc if i == 0 else d
                if i in fills:  # model - base, amplified
                    fills[i](delta.copy_(x[start:end]).sub_(base), dst)
                else:
                    dst.copy_(x[start:end])
                    if model:
                        dst.sub_(base)
                if i == 0:
                    acc.mul_(w)
                else:
                    acc.add_(d, alpha=w)
            torch.add(base, acc, alpha=self.step.lambda_, out=acc)
            result.put(start, end, acc)
        return result.finish(inputs[0].shape, ctx)

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        out = deltas[0] * self.weights[0]
        for w, d in zip(self.weights[1:], deltas[1:], strict=True):
            out.add_(d, alpha=w)
        return out


class LinearStep(MergeStep):
    """``sum_i w_i M_i / sum_i w_i`` over whole models; ``base`` only names the config source."""

    method: Literal["linear"]
    lambda_: float = Field(1.0, alias="lambda", description="Not used by linear (must stay 1).")

    @model_validator(mode="after")
    def _check_linear(self) -> LinearStep:
        if self.lambda_ != 1.0:
            raise ValueError("linear averages models and has no lambda; use task_arithmetic to scale deltas")
        if self.weights is not None and sum(self.weights) == 0:
            raise ValueError("weights sum to 0: a weighted average needs a non-zero total")
        return self


@register_method
class Linear(MergeOp):
    """Weighted average of models (Wortsman et al. 2022, model soups)."""

    method = "linear"
    Step = LinearStep
    needs_base = False

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        problems = [
            ("inputs", f"'{i}' is a delta; linear averages models (use task_arithmetic for deltas)")
            for i in self.step.inputs
            if i in kinds and kinds[i].kind != "model"
        ]
        if problems:
            return None, problems
        return super().infer_kind(kinds)

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        try:
            return same_tensors(self.step.id, [(s, inputs[s]) for s in self.step.inputs])
        except ShapeError as exc:
            raise ShapeError(exc.message, step=self.step.id) from None

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        w = self.weights
        flat = [t.reshape(-1) for t in inputs]
        result = ChunkedResult(flat[0].numel(), self.emit_dtype, flat[0].device, scratch=2)
        for start, end, (acc, d) in result.chunks():
            acc.copy_(flat[0][start:end])
            acc.mul_(w[0])
            for wi, x in zip(w[1:], flat[1:], strict=True):
                d.copy_(x[start:end])
                acc.add_(d, alpha=wi)
            acc.div_(sum(w))
            result.put(start, end, acc)
        return result.finish(inputs[0].shape, ctx)
