"""The step DAG: one node per recipe step, edges from the steps it uses. Checked before any I/O."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

import networkx as nx

from mergeengine.errors import RecipeError
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
        graph: networkx DiGraph with an edge ``a -> b`` when step ``b`` uses step ``a``.
    """

    loaded: LoadedRecipe
    ops: dict[str, Op]
    kinds: dict[str, StepKind]
    graph: nx.DiGraph

    def saves(self) -> list[str]:
        """Ids of the save steps, in recipe order."""
        return [s for s, op in self.ops.items() if op.name == "save"]

    def needed(self, roots: list[str]) -> list[str]:
        """Steps that ``roots`` depend on (roots included), in recipe order."""
        keep = set(roots)
        for r in roots:
            keep |= nx.ancestors(self.graph, r)
        return [s for s in self.ops if s in keep]


def build_step_graph(loaded: LoadedRecipe) -> StepGraph:
    """Check ids, references, order, cycles and kinds; all problems are reported together.

    Raises:
        RecipeError: one line per problem with ``file:line:col: step 'id': ...``.
    """
    problems: list[str] = []
    ops: dict[str, Op] = {}
    index: dict[str, int] = {}
    steps = loaded.recipe.steps
    for i, step in enumerate(steps):
        if step.id in ops:
            problems.append(f"{loaded.where(('steps', i, 'id'))}: step '{step.id}': duplicate step id "
                            f"(first used by step #{index[step.id] + 1})")
            continue
        ops[step.id] = get_op(step.op, getattr(step, "method", None))(step)
        index[step.id] = i

    graph = nx.DiGraph()
    graph.add_nodes_from(ops)
    bad_refs: set[tuple[str, str]] = set()
    for sid, op in ops.items():
        i = index[sid]
        for field, refs in op.references().items():
            for j, ref in enumerate(refs):
                path = ("steps", i, field, j) if isinstance(getattr(op.step, field), list) else ("steps", i, field)
                where = loaded.where(path)
                if ref not in ops:
                    hint = difflib.get_close_matches(ref, list(ops), n=1)
                    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                    problems.append(f"{where}: step '{sid}': field '{field}' refers to unknown step '{ref}'{extra}")
                    bad_refs.add((sid, ref))
                    continue
                graph.add_edge(ref, sid)
                if ref == sid:
                    problems.append(f"{where}: step '{sid}': field '{field}' refers to the step itself")
                    bad_refs.add((sid, ref))
                elif index[ref] > i:
                    bad_refs.add((sid, ref))
    try:
        cycle = nx.find_cycle(graph)
        names = [a for a, _ in cycle] + [cycle[0][0]]
        problems.append(f"{loaded.where(('steps', index[names[0]]))}: step '{names[0]}': cycle: {' -> '.join(names)}")
    except nx.NetworkXNoCycle:
        for sid, ref in sorted(bad_refs):
            if ref in ops and ref != sid:
                problems.append(
                    f"{loaded.where(('steps', index[sid]))}: step '{sid}': uses step '{ref}', which comes later; "
                    "steps may only use earlier steps (move it up)"
                )

    kinds: dict[str, StepKind] = {}
    if not problems:
        for sid, op in ops.items():
            kind, kind_problems = op.infer_kind(kinds)
            for field, msg in kind_problems:
                problems.append(f"{loaded.where(('steps', index[sid], field))}: step '{sid}': {msg}")
            if kind is not None:
                kinds[sid] = kind
                op.kind = kind
    problems += _check_search(loaded, ops)
    if problems:
        raise RecipeError(problems)
    return StepGraph(loaded, ops, kinds, graph)


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
