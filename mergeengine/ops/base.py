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
from mergeengine.io.checkpoint import TensorMeta
from mergeengine.recipe.step import STEP_ID_PATTERN, StepModel

__all__ = ["STEP_ID_PATTERN", "Op", "Reduction", "StepKind", "StepModel", "TaskContext", "same_tensors"]


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


@dataclass
class TaskContext:
    """What a per-tensor computation may use besides its input tensors.

    Attributes:
        step: the step id.
        tensor: the tensor name.
        seed: the recipe seed.
        device: where math runs.
        stats: results of this step's reductions, by name.
        checked_finite: set by an op that has verified its result holds no NaN/Inf (the
            executor then skips its own check of that result before saving it).
        stats_of: every step's reduction results, by step id (for an op that does another
            step's work, see ``TaskArithmetic.fuse_deltas``).
    """

    step: str
    tensor: str
    seed: int
    device: torch.device
    stats: Mapping[str, Any]
    checked_finite: bool = False
    stats_of: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class Op:
    """Base class of all ops. Subclasses set ``name`` and ``Step`` and override what they need."""

    name: ClassVar[str]
    Step: ClassVar[type[StepModel]]
    #: True when the op's math, not its I/O, dominates its tasks (many float32 ops per entry):
    #: the executor then gives torch every core (see :func:`mergeengine.runtime.use_threads`).
    compute_bound: ClassVar[bool] = False

    def __init__(self, step: StepModel) -> None:
        self.step = step
        self.kind: StepKind | None = None
        self.metas: dict[str, TensorMeta] = {}

    # ---- validation (no data) -------------------------------------------------------------
    def references(self) -> dict[str, list[str]]:
        """Step ids this step refers to, by field name (``{"inputs": ["a", "b"]}``)."""
        return {}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        """Check input kinds. Returns (this step's kind, [(field, problem), ...])."""
        raise NotImplementedError

    # ---- planning (headers only) -------------------------------------------------------------
    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        """Output tensors from the input steps' tensors. Raise ShapeError listing every mismatch."""
        raise NotImplementedError

    def sources(self, name: str) -> list[Source]:
        """The input tensors ``compute`` receives for output tensor ``name``, in order."""
        raise NotImplementedError

    def bind(self, checkpoints: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Before :meth:`plan_tensors`: the opened checkpoints of the load steps so far, by step id
        (``vocab_align`` reads tokenizers from them). Default: nothing."""

    def write_files(self, dest: Path) -> None:  # noqa: B027 - optional hook
        """Write files of this step's making into an output folder that depends on it, after the
        origin's tokenizer files (``vocab_align``: the union tokenizer). Default: nothing."""

    def adjust_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The output's config.json as this step changes it (default: unchanged; ``slices``
        sets ``num_hidden_layers``)."""
        return config

    def stats_steps(self) -> list[str]:
        """Other steps whose reductions must finish before this step's tasks (their results
        arrive in ``TaskContext.stats_of``). Default: none."""
        return []

    def reductions(self) -> list[Reduction]:
        """Whole-model statistics this step needs; empty for purely per-tensor ops."""
        return []

    # ---- execution ---------------------------------------------------------------------------
    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor | None:
        """Compute output tensor ``ctx.tensor`` from its sources."""
        raise NotImplementedError

    def with_params(self, values: Mapping[str, Any]) -> Op:
        """This op for one tensor whose scheduled fields take ``values`` (python field names).

        The planner's per-tensor values (see :mod:`mergeengine.graph.params`) flow in here: the
        returned op shares everything planned, only its step differs. ``self`` is unchanged.
        """
        view = copy.copy(self)
        view.step = self.step.model_copy(update=dict(values))
        return view

    def report(self, stats: dict[str, Any]) -> dict[str, Any] | None:
        """This step's entry of ``dppa_report.json`` from its statistics; None: nothing to report."""
        return None

    def describe(self) -> dict[str, Any]:
        """Resolved parameters (defaults filled in), for plans and provenance."""
        return self.step.model_dump(by_alias=True, mode="json")


def same_tensors(
    step: str,
    named_inputs: list[tuple[str, dict[str, TensorMeta]]],
    *,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, TensorMeta]:
    """Check that all inputs have the same tensor names and shapes; return the first's (as ``dtype``).

    Every mismatch is listed in one error, so a user sees them all at once.

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
        for n, meta in ref.items():
            if n in other and other[n].shape != meta.shape:
                problems.append(
                    f"tensor '{n}': shape {list(other[n].shape)} in '{other_id}' vs {list(meta.shape)} in '{ref_id}'"
                )
            elif n in other and other[n].dtype != meta.dtype and not (
                other[n].dtype.is_floating_point and meta.dtype.is_floating_point
            ):
                # floating dtypes mix freely (math is float32); integer buffers must agree
                problems.append(f"tensor '{n}': dtype {other[n].dtype} in '{other_id}' vs {meta.dtype} in '{ref_id}'")
    if problems:
        raise ShapeError("; ".join(problems), step=step)
    return {n: TensorMeta(m.shape, dtype or m.dtype) for n, m in ref.items()}


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor(s) ({shown}{more})"
