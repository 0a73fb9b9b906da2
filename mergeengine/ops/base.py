"""What an op is: a pydantic step schema plus per-tensor behaviour.

An op class declares its step schema (``Step``), checks the kinds of its inputs, says which tensors
it produces (from its inputs' headers alone), which input tensors each output tensor needs, and
computes one output tensor at a time. Ops that need whole-model statistics declare
:class:`Reduction` objects; the planner turns each into a streaming pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from mergeengine.errors import ShapeError
from mergeengine.io.meta import TensorMeta
from mergeengine.recipe.step import STEP_ID_PATTERN, StepModel

__all__ = ["STEP_ID_PATTERN", "ChunkFill", "Op", "PlanInputs", "Reduction", "StepKind", "StepModel", "StepPlan",
           "TaskContext", "same_tensors"]


Kind = Literal["model", "delta"]


@dataclass(frozen=True)
class StepKind:
    """What a step's output is.

    Attributes:
        kind: ``model`` (full weights) or ``delta`` (a task vector relative to ``base``).
        origin: the load step whose config.json and tokenizer describe this output.
        base: for deltas, the step holding the model the delta is relative to.
    """

    kind: Kind
    origin: str
    base: str | None = None


Source = tuple[str, str]  # (step id, tensor name)


@dataclass
class Reduction:
    """A whole-model statistic computed in a streaming pass before the per-tensor work.

    The planner runs ``map`` on every tensor in ``tensors`` (fed with the same inputs the op's
    ``compute`` gets for that tensor), folds each result into an accumulator with ``fold`` as soon
    as it is produced (so partial results never pile up), then calls ``finish``. ``after`` names
    earlier reductions of the same step whose results ``map`` and ``finish`` need.

    Attributes:
        name: unique within the step, e.g. ``"module_stats"``.
        tensors: output tensor names to visit.
        map: (tensor name, input tensors, results of earlier reductions) -> partial.
        finish: (accumulator, results of earlier reductions) -> result.
        fold: (accumulator, tensor name, partial) -> accumulator; default collects a dict.
        after: names of this step's reductions that must finish first.
        label: shown on the progress bar.
    """

    name: str
    tensors: list[str]
    map: Callable[[str, list[torch.Tensor], Mapping[str, Any]], Any]
    finish: Callable[[Any, Mapping[str, Any]], Any]
    fold: Callable[[Any, str, Any], Any] | None = None
    after: list[str] = field(default_factory=list)
    label: str = ""

    def initial(self) -> Any:
        return {}

    def fold_partial(self, acc: Any, name: str, partial: Any) -> Any:
        if self.fold is not None:
            return self.fold(acc, name, partial)
        acc[name] = partial
        return acc


@dataclass(frozen=True)
class StepPlan:
    """What the planner decided for one step. Immutable; every task of the step gets it as ``ctx.plan``.

    Attributes:
        metas: the tensors the step produces (name -> shape/dtype).
        kind: what the step produces (model or delta), from validation.
        input_kinds: referenced step id -> ``model`` or ``delta`` (a fused diff's input reads a model).
        target_rows: tensor -> rows every input is padded or truncated to (vocabulary alignment).
        read_from: input step id -> the steps read in its place (a fused ``diff``: its model, and
            for a delta op also its base).
        fused: input step ids whose op this step computes chunk by chunk (fused amplification).
        emit_dtype: the dtype floating-point results are returned in (a save: the stored dtype);
            None: float32.
        groups: decoder linear tensors -> (layer, module), for the ops that treat them apart.
        details: op-specific results of planning (a load's checkpoint, a diff's row mismatches).
        params: tensor -> the step's scheduled fields resolved for it (python names, a field of
            a list's object by its path, ``partitions.0.density``; see :mod:`mergeengine.graph.params`).
    """

    metas: Mapping[str, TensorMeta]
    kind: StepKind
    input_kinds: Mapping[str, Kind] = field(default_factory=dict)
    target_rows: Mapping[str, int] = field(default_factory=dict)
    read_from: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fused: tuple[str, ...] = ()
    emit_dtype: torch.dtype | None = None
    groups: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanInputs:
    """What :meth:`Op.plan_step` may use: headers only, no tensor data.

    Attributes:
        metas: referenced step id -> its tensors.
        kinds: every validated step's kind, by step id.
        checkpoint: the opened input of a load step (None for other ops).
        model_dtype: for a save, the dtype most of the origin model's floating bytes are stored in.
        checkpoints: the opened checkpoints of the load steps planned so far, by step id
            (``vocab_align`` reads the models' tokenizers from them).
    """

    metas: Mapping[str, Mapping[str, TensorMeta]]
    kinds: Mapping[str, StepKind]
    checkpoint: Any = None
    model_dtype: torch.dtype | None = None
    checkpoints: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What a per-tensor computation may use besides its input tensors.

    Attributes:
        step: the step id.
        tensor: the tensor name.
        seed: the recipe seed.
        device: where math runs.
        stats: results of this step's reductions, by name.
        plan: the planner's decisions for the step (immutable).
        stats_of: every step's reduction results, by step id (for a step that does another
            step's work, see :meth:`Op.fuse_deltas`).
        checked_finite: set by an op that has verified its result holds no NaN/Inf (the
            executor then skips its own check of that result before saving it).
    """

    step: str
    tensor: str
    seed: int
    device: torch.device
    stats: Mapping[str, Any]
    plan: StepPlan
    stats_of: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    checked_finite: bool = False


#: ``fill(delta chunk, out)``: a fused delta op's output for one chunk of ``model - base``.
ChunkFill = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class Op:
    """Base class of all ops: the whole contract between an op, the planner and the executor.

    Subclasses set ``name`` and ``Step`` and override what they need; every hook has a default
    here. An op holds only its validated step: what the planner decides arrives as a
    :class:`StepPlan` (``plan_step`` builds it, the ``fuse_*`` and ``emit_in`` hooks return
    updated copies), and each task receives it in :attr:`TaskContext.plan`.
    """

    name: ClassVar[str]
    Step: ClassVar[type[StepModel]]
    #: True when the op's math, not its I/O, dominates its tasks (many float32 ops per entry):
    #: the executor then gives torch every core (see :func:`mergeengine.runtime.use_threads`).
    compute_bound: ClassVar[bool] = False

    def __init__(self, step: StepModel) -> None:
        self.step = step

    @property
    def label(self) -> str:
        """The op as plans and model cards name it (``merge`` steps: their method)."""
        return self.name

    # ---- validation (no data) -------------------------------------------------------------
    def references(self) -> dict[str, list[str]]:
        """Step ids this step refers to, by field name (``{"inputs": ["a", "b"]}``)."""
        return {}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        """Check input kinds. Returns (this step's kind, [(field, problem), ...])."""
        raise NotImplementedError

    # ---- planning (headers only) -------------------------------------------------------------
    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """The step's plan: its output tensors from its inputs' headers, and what else it decides.

        Raises:
            ShapeError: listing every mismatch.
        """
        raise NotImplementedError

    def fuse_diffs(self, plan: StepPlan, ops: Mapping[str, Op]) -> StepPlan:
        """Read fine-tuned models (and their base) in place of plain ``diff`` inputs, where the
        op can subtract chunk by chunk itself; returns the plan with ``read_from`` set. Default: no."""
        return plan

    def fuse_deltas(self, plan: StepPlan, ops: Mapping[str, Op], plans: Mapping[str, StepPlan],
                    users: Mapping[str, list[str]]) -> StepPlan:
        """Compute inputs made by other delta ops chunk by chunk (see :meth:`fusable_into_merge`)
        instead of reading their stored results; returns the plan with ``fused`` set. Default: no."""
        return plan

    def fusable_into_merge(self, plan: StepPlan) -> bool:
        """Whether a merge may compute this step's output itself, chunk by chunk
        (:meth:`chunk_amplifier`), given this step's plan. Default: no."""
        return False

    def chunk_amplifier(self, plan: StepPlan, model: torch.Tensor, base: torch.Tensor, tensor: str,
                        stats: Mapping[str, Any]) -> ChunkFill:
        """This step's output for ``tensor`` as a chunk function, for a merge that reads ``model``
        and ``base`` itself (only called when :meth:`fusable_into_merge`)."""
        raise NotImplementedError(f"op '{self.name}' cannot be fused into a merge")

    def emit_in(self, plan: StepPlan, dtype: torch.dtype) -> StepPlan:
        """The plan for returning floating results in ``dtype`` (the planner asks when every
        consumer is a save of that dtype). Default: keep float32."""
        return plan

    def sources(self, name: str, plan: StepPlan) -> list[Source]:
        """The input tensors ``compute`` receives for output tensor ``name``, in order."""
        raise NotImplementedError

    def write_files(self, plan: StepPlan, dest: Path) -> None:  # noqa: B027 - optional hook
        """Write files of this step's making into an output folder that depends on it, after the
        origin's tokenizer files (``vocab_align``: the union tokenizer, from ``plan.details``).
        Default: nothing."""

    def adjust_config(self, plan: StepPlan, config: dict[str, Any]) -> dict[str, Any]:
        """The output's config.json as this step changes it, a new dict (default: unchanged;
        ``slices`` sets ``num_hidden_layers``)."""
        return config

    def stats_steps(self, plan: StepPlan) -> list[str]:
        """Other steps whose reductions must finish before this step's tasks (their results
        arrive in ``TaskContext.stats_of``). Default: none."""
        return list(plan.fused)

    def reductions(self, plan: StepPlan) -> list[Reduction]:
        """Whole-model statistics this step needs; empty for purely per-tensor ops."""
        return []

    def is_compute_bound(self, plan: StepPlan) -> bool:
        """Whether this step's tasks are compute-bound (default: :attr:`compute_bound`)."""
        return self.compute_bound

    def plan_notes(self, plan: StepPlan) -> list[str]:
        """Lines ``mergeengine plan`` shows under the step. Default: none."""
        return []

    def explain(self, plan: StepPlan, tensor: str) -> list[str]:
        """Lines ``mergeengine plan --explain TENSOR`` shows under the step's parameters (what
        they become for ``tensor`` beyond the fields themselves). Default: none."""
        return []

    # ---- execution ---------------------------------------------------------------------------
    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor | None:
        """Compute output tensor ``ctx.tensor`` from its sources."""
        raise NotImplementedError

    def with_params(self, values: Mapping[str, Any]) -> Op:
        """This op for one tensor whose scheduled fields take ``values`` (python field names, or
        the path of a field inside a list of objects: ``partitions.0.density``).

        The planner's per-tensor values (see :mod:`mergeengine.graph.params`) flow in here: the
        returned op is a new one over the updated step; ``self`` is unchanged.
        """
        view = copy.copy(self)
        view.step = _updated(self.step, values)
        return view

    def for_tensor(self, plan: StepPlan, tensor: str) -> Op:
        """This op with its scheduled fields at ``tensor``'s values (itself when none is scheduled)."""
        values = plan.params.get(tensor)
        return self.with_params(values) if values else self

    def report(self, plan: StepPlan, stats: dict[str, Any]) -> dict[str, Any] | None:
        """This step's entry of ``dppa_report.json`` from its statistics; None: nothing to report."""
        return None

    def describe(self) -> dict[str, Any]:
        """Resolved parameters (defaults filled in), for plans and provenance."""
        return self.step.model_dump(by_alias=True, mode="json")


def _updated(step: StepModel, values: Mapping[str, Any]) -> StepModel:
    """``step`` with ``values`` set (a dotted name sets a field of one object of a list field)."""
    flat = {k: v for k, v in values.items() if "." not in k}
    for path, value in values.items():
        if "." in path:
            name, j, key = path.split(".")
            items = list(flat.get(name, getattr(step, name)))
            items[int(j)] = items[int(j)].model_copy(update={key: value})
            flat[name] = items
    return step.model_copy(update=flat)


def same_tensors(
    step: str,
    named_inputs: list[tuple[str, dict[str, TensorMeta]]],
) -> dict[str, TensorMeta]:
    """Check that all inputs have the same tensor names and shapes; return the first's, as float32.

    Every kind of mismatch is reported in one error, so a user sees them all at once (the first
    few tensors whose shapes differ, and how many more: a model of another size differs in all).

    Raises:
        ShapeError: names or shapes differ.
    """
    ref_id, ref = named_inputs[0]
    problems: list[str] = []
    for other_id, other in named_inputs[1:]:
        missing = [n for n in ref if n not in other]
        extra = [n for n in other if n not in ref]
        if missing:
            problems.append(f"'{other_id}' lacks {_names(missing)} present in '{ref_id}'")
        if extra:
            problems.append(f"'{other_id}' has {_names(extra)} absent from '{ref_id}'")
        differ = _differences(ref_id, ref, other_id, other)
        problems += differ[:_SHOWN_DIFFERENCES]
        if len(differ) > _SHOWN_DIFFERENCES:
            problems.append(f"and {len(differ) - _SHOWN_DIFFERENCES} more tensors that differ")
    if problems:
        raise ShapeError("; ".join(problems), step=step)
    import torch

    return {n: TensorMeta(m.shape, torch.float32) for n, m in ref.items()}


#: Tensors with another shape or dtype that one error shows (a model of another size differs in all).
_SHOWN_DIFFERENCES = 8


def _differences(ref_id: str, ref: dict[str, TensorMeta], other_id: str, other: dict[str, TensorMeta]) -> list[str]:
    """One line per tensor whose shape (or integer dtype) differs between two inputs."""
    out = []
    for n, meta in ref.items():
        if n in other and other[n].shape != meta.shape:
            out.append(f"tensor '{n}': shape {list(other[n].shape)} in '{other_id}' vs {list(meta.shape)} in '{ref_id}'")
        elif n in other and other[n].dtype != meta.dtype and not (
            other[n].dtype.is_floating_point and meta.dtype.is_floating_point
        ):
            # floating dtypes mix freely (math is float32); integer buffers must agree
            out.append(f"tensor '{n}': dtype {other[n].dtype} in '{other_id}' vs {meta.dtype} in '{ref_id}'")
    return out


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor(s) ({shown}{more})"
