"""The step DAG: one node per recipe step, edges from the steps it uses. Checked before any I/O
(with the standard library only: validation stays fast)."""

from __future__ import annotations

import difflib
import graphlib
import logging
from dataclasses import dataclass

from mergeengine.errors import RecipeError
from mergeengine.methods import MergeStep
from mergeengine.ops import get_op
from mergeengine.ops.base import Op, StepKind
from mergeengine.recipe.loader import LoadedRecipe

LOG = logging.getLogger(__name__)


@dataclass
class StepGraph:
    """Validated steps, wired together.

    Attributes:
        loaded: the recipe this came from.
        ops: step id -> op instance, in recipe order.
        kinds: step id -> what the step produces.
        uses: step id -> the steps it uses (each once, in the order referenced).
    """

    loaded: LoadedRecipe
    ops: dict[str, Op]
    kinds: dict[str, StepKind]
    uses: dict[str, list[str]]

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(a, b)`` for every step ``b`` that uses step ``a``."""
        return [(a, b) for b, refs in self.uses.items() for a in refs]

    def saves(self) -> list[str]:
        """Ids of the save steps, in recipe order."""
        return [s for s, op in self.ops.items() if op.name == "save"]

    def needed(self, roots: list[str]) -> list[str]:
        """Steps that ``roots`` depend on (roots included), in recipe order."""
        keep: set[str] = set()
        todo = list(roots)
        while todo:
            s = todo.pop()
            if s not in keep:
                keep.add(s)
                todo.extend(self.uses.get(s, []))
        return [s for s in self.ops if s in keep]


def build_step_graph(loaded: LoadedRecipe) -> StepGraph:
    """Check ids, references, order, cycles and kinds; all problems are reported together.

    Raises:
        RecipeError: one line per problem with ``file:line:col: step 'id': ...``.
    """
    ops, index, problems = _make_ops(loaded)
    uses, later, ref_problems = _wire(loaded, ops, index)
    problems += ref_problems + _order_problems(loaded, index, uses, later)
    kinds: dict[str, StepKind] = {}
    if not problems:
        for sid, op in ops.items():
            kind, kind_problems = op.infer_kind(kinds)
            problems += [f"{loaded.where(('steps', index[sid], field))}: step '{sid}': {msg}"
                         for field, msg in kind_problems]
            if kind is not None:
                kinds[sid] = kind
    problems += _check_search(loaded, ops)
    if problems:
        raise RecipeError(problems)
    return StepGraph(loaded, ops, kinds, uses)


def _make_ops(loaded: LoadedRecipe) -> tuple[dict[str, Op], dict[str, int], list[str]]:
    """One op per step (by id), each step's index, and the duplicate-id problems."""
    problems: list[str] = []
    ops: dict[str, Op] = {}
    index: dict[str, int] = {}
    for i, step in enumerate(loaded.recipe.steps):
        if step.id in ops:
            problems.append(f"{loaded.where(('steps', i, 'id'))}: step '{step.id}': duplicate step id "
                            f"(first used by step #{index[step.id] + 1})")
            continue
        ops[step.id] = get_op(step.op, step.method if isinstance(step, MergeStep) else None)(step)
        index[step.id] = i
    return ops, index, problems


def _wire(loaded: LoadedRecipe, ops: dict[str, Op],
          index: dict[str, int]) -> tuple[dict[str, list[str]], list[tuple[str, str]], list[str]]:
    """Each step's uses; the references to later steps; unknown and self references."""
    uses: dict[str, list[str]] = {sid: [] for sid in ops}
    later: list[tuple[str, str]] = []
    problems: list[str] = []
    for sid, op in ops.items():
        i = index[sid]
        for field, refs in op.references().items():
            listed = isinstance(getattr(op.step, field), list)
            for j, ref in enumerate(refs):
                where = loaded.where(("steps", i, field, j) if listed else ("steps", i, field))
                if ref not in ops:
                    hint = difflib.get_close_matches(ref, list(ops), n=1)
                    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                    problems.append(f"{where}: step '{sid}': field '{field}' refers to unknown step '{ref}'{extra}")
                    continue
                if ref not in uses[sid]:
                    uses[sid].append(ref)
                if ref == sid:
                    problems.append(f"{where}: step '{sid}': field '{field}' refers to the step itself")
                elif index[ref] > i:
                    later.append((sid, ref))
    return uses, later, problems


def _order_problems(loaded: LoadedRecipe, index: dict[str, int], uses: dict[str, list[str]],
                    later: list[tuple[str, str]]) -> list[str]:
    """A cycle (one line), or else every use of a later step."""
    try:
        graphlib.TopologicalSorter(uses).prepare()
    except graphlib.CycleError as exc:
        names = exc.args[1]
        return [f"{loaded.where(('steps', index[names[0]]))}: step '{names[0]}': cycle: {' -> '.join(names)}"]
    return [f"{loaded.where(('steps', index[sid]))}: step '{sid}': uses step '{ref}', which comes later; "
            "steps may only use earlier steps (move it up)" for sid, ref in sorted(set(later))]


def _check_search(loaded: LoadedRecipe, ops: dict[str, Op]) -> list[str]:
    """The search block may only tune existing numeric fields (see search/space.py) and evaluate a save step."""
    from mergeengine.search.space import check_references, check_space

    search = loaded.recipe.search
    if search is None:
        return []
    problems = check_space(loaded, ops) + check_references(loaded, ops)
    for i, f in enumerate(search.factors):
        where = loaded.where(("search", "factors", i, "step"))
        op = ops.get(f.step)
        if op is None or op.name != "dpa_amplify":
            problems.append(f"{where}: search: factor step '{f.step}' is not a dpa_amplify step")
        elif f.partition >= len(op.step.partitions):  # type: ignore[attr-defined]
            problems.append(f"{where}: search: step '{f.step}' has {len(op.step.partitions)} partitions, "  # type: ignore[attr-defined]
                            f"no partition {f.partition}")
    saves = [s for s, op in ops.items() if op.name == "save"]
    if search.target is not None and search.target not in saves:
        problems.append(f"{loaded.where(('search', 'target'))}: search: target '{search.target}' is not a save step")
    elif search.target is None and len(saves) != 1:
        problems.append(f"{loaded.where(('search',))}: search: name the save step to evaluate with 'target'")
    return problems
