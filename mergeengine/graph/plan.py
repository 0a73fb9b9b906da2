"""The tensor-level plan: per-tensor tasks, their schedule, and an exact memory/I-O estimate.

Every step is expanded into one task per tensor name. A task is identified by
``(step, tensor, pass)``: the main pass has ``pass == ""``; a step with a whole-model statistic
(:class:`~mergeengine.ops.base.Reduction`) gets a *statistics pass* named ``"<step>/<reduction>"``
in which its inputs are recomputed tensor by tensor, mapped to small partial results, and folded
into one reduce node. Recomputing (rather than keeping every delta until the statistic is known)
is what keeps memory at a few tensors. See docs/architecture.md for a worked example.

The schedule is networkx's lexicographic topological sort keyed by
``(phase, tensor rank, step rank)``: a statistics pass runs before everything that needs its
result, and within a pass each tensor's chain (load -> diff -> ... -> save) finishes before the
next tensor is loaded. Values are freed after their last consumer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import networkx as nx
import torch

from mergeengine.errors import MergeEngineError, RecipeError
from mergeengine.graph.params import resolve_schedules
from mergeengine.graph.steps import StepGraph
from mergeengine.io.checkpoint import Checkpoint
from mergeengine.io.resolve import open_checkpoint
from mergeengine.ops.base import Op, PlanInputs, Reduction, StepPlan, TensorMeta
from mergeengine.ops.load import LoadOp
from mergeengine.ops.save import SaveOp

TaskKind = Literal["compute", "map", "reduce"]


@dataclass(frozen=True, order=True)
class TaskKey:
    """One unit of work: a step's tensor in a pass, a reduction's map on a tensor, or a reduce.

    Attributes:
        step: the step.
        tensor: the tensor name (empty for a reduce).
        kind: ``compute`` (a step's tensor), ``map`` (a reduction's partial of one tensor) or
            ``reduce`` (a reduction's result).
        reduction: for map and reduce tasks, the reduction's name.
        stats_pass: for compute tasks feeding a statistics pass, that pass (its phase + 1);
            0 for the main pass.
        pass_of: while the plan is built, the (step, reduction) a statistics pass's compute task
            feeds (replaced by ``stats_pass`` once the phases are known).
        copy_for: for a main-pass value two output tensors need (a layer that ``slices`` repeat
            or move), the output tensor this copy is computed again for (empty: the first).
    """

    step: str
    tensor: str = ""
    kind: TaskKind = "compute"
    reduction: str = ""
    stats_pass: int = 0
    pass_of: tuple[str, str] = ("", "")
    copy_for: str = ""

    def __str__(self) -> str:
        if self.kind == "reduce":
            return f"reduce {self.step}/{self.reduction}"
        where = f" [{self.step}/{self.reduction}]" if self.kind == "map" else (
            f" [pass {self.stats_pass}]" if self.stats_pass else "")
        again = f" [for {self.copy_for}]" if self.copy_for else ""
        return f"{self.kind} {self.step}:{self.tensor}{where}{again}"


@dataclass
class Estimate:
    """What a run will do, from headers alone."""

    tensors_written: int = 0
    bytes_read: int = 0
    bytes_read_unique: int = 0
    bytes_written: int = 0
    peak_live_bytes: int = 0
    largest_tensor_bytes: int = 0
    passes: int = 1


@dataclass
class Plan:
    """Everything the executor needs.

    Attributes:
        steps: the validated step graph.
        active: step ids that contribute to a save (recipe order).
        step_plans: step id -> what the planner decided for it (immutable; each task gets it).
        metas: step id -> tensor name -> shape/dtype of what the step produces.
        graph: task DAG (edges from producer to consumer).
        order: the schedule.
        sources: task -> the tasks whose values it receives, in the op's order.
        reductions: (step, reduction name) -> Reduction.
        phase: task -> the pass it belongs to (0-based; statistics passes first).
        save_order: save step id -> tensor names in the order they will be written.
        checkpoints: load step id -> opened checkpoint.
        estimate: bytes read/written and peak live memory.
    """

    steps: StepGraph
    active: list[str]
    step_plans: dict[str, StepPlan]
    metas: dict[str, dict[str, TensorMeta]]
    graph: nx.DiGraph
    order: list[TaskKey]
    sources: dict[TaskKey, list[TaskKey]]
    reductions: dict[tuple[str, str], Reduction]
    phase: dict[TaskKey, int]
    save_order: dict[str, list[str]]
    checkpoints: dict[str, Checkpoint]
    save_paths: dict[str, Path] = field(default_factory=dict)
    estimate: Estimate = field(default_factory=Estimate)
    prefetch_bytes: int = 0

    @property
    def ops(self) -> dict[str, Op]:
        return self.steps.ops

    def op_for(self, key: TaskKey) -> Op:
        """The op that computes ``key``: its step's, with scheduled parameters resolved for the tensor."""
        return self.steps.ops[key.step].for_tensor(self.step_plans[key.step], key.tensor)

    def phase_labels(self) -> list[str]:
        """A label per pass, e.g. ``["statistics p_math/module outliers", "merge"]``."""
        n = max(self.phase.values(), default=0) + 1
        labels: list[list[str]] = [[] for _ in range(n)]
        for key, ph in self.phase.items():
            if key.kind == "reduce":
                red = self.reductions[(key.step, key.reduction)]
                labels[ph].append(f"{key.step}/{red.label or red.name}")
        return [f"statistics {', '.join(sorted(ls))}" if ls else "merge" for ls in labels]


def natural_key(name: str) -> tuple:
    """Sort ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def build_plan(
    steps: StepGraph,
    *,
    out: str | Path | None = None,
    checkpoints: dict[str, Checkpoint] | None = None,
    roots: list[str] | None = None,
    prefetch: bool = True,
) -> Plan:
    """Open the inputs' headers, expand steps into tensor tasks, schedule them and estimate costs.

    Args:
        steps: the validated step graph.
        out: overrides the path of the (single) save step, resolved against the current folder.
        checkpoints: already opened checkpoints by load step id (reused across plans).
        roots: steps whose tensors are wanted (default: all save steps).
        prefetch: read the next tensor's inputs in the background while computing the current one.

    Returns:
        The plan. Reads headers only.

    Raises:
        RecipeError: no save step, or ``out`` is ambiguous.
        ModelError, ShapeError: an input cannot be opened, or tensors do not line up.
    """
    saves = steps.saves()
    if roots is None:
        roots = saves
        if not saves:
            raise RecipeError([f"{steps.loaded.path}: the recipe has no save step: add one "
                               "(- {id: out, op: save, input: <step>, path: ./merged})"])
    save_paths = _save_paths(steps, saves, roots, out)
    active = steps.needed(roots)
    ckpts = dict(checkpoints or {})
    plans = _plan_steps(steps, active, ckpts)
    for sid, values in resolve_schedules(steps, active, plans).items():  # what reductions and fusions read
        plans[sid] = dataclasses.replace(plans[sid], params=values)
    users = _users(steps, active)
    for sid in active:  # merges read fine-tunes directly instead of materialised deltas
        plans[sid] = steps.ops[sid].fuse_diffs(plans[sid], steps.ops)
    for sid in active:  # ... and amplify them chunk by chunk instead of reading amplified deltas
        plans[sid] = steps.ops[sid].fuse_deltas(plans[sid], steps.ops, plans, users)
    _emit_stored_dtypes(steps, active, plans, users)
    plan = _expand(steps, active, plans, roots)
    plan.checkpoints = ckpts
    plan.save_paths = save_paths
    plan.prefetch_bytes = default_prefetch_bytes(plan) if prefetch else 0
    plan.estimate = simulate(plan, plan.prefetch_bytes)
    plan.estimate.bytes_read_unique = sum(
        m.nbytes for sid in active if isinstance(steps.ops[sid], LoadOp) for m in plan.metas[sid].values()
    )
    return plan


def _save_paths(steps: StepGraph, saves: list[str], roots: list[str], out: str | Path | None) -> dict[str, Path]:
    """Where each save step writes (``out`` overrides the single save's path)."""
    loaded = steps.loaded
    save_paths: dict[str, Path] = {}
    for s in saves:
        p = steps.ops[s].step.path  # type: ignore[attr-defined]
        if p is not None:
            save_paths[s] = (loaded.base_dir / Path(p).expanduser()).resolve()
    if out is not None:
        if len(saves) != 1:
            raise RecipeError([f"{loaded.path}: --out needs exactly one save step, the recipe has {len(saves)}"])
        save_paths[saves[0]] = Path(out).expanduser().resolve()
    for s in saves:
        if s in roots and s not in save_paths:
            raise RecipeError([f"{loaded.where(('steps',))}: step '{s}': no path: set 'path' or pass --out"])
    return save_paths


def _plan_steps(steps: StepGraph, active: list[str], ckpts: dict[str, Checkpoint]) -> dict[str, StepPlan]:
    """Every active step's plan from its inputs' headers (opening the load steps' checkpoints
    into ``ckpts``). All input problems are raised together."""
    loaded = steps.loaded
    plans: dict[str, StepPlan] = {}
    failures: list[MergeEngineError] = []
    for sid in active:
        op = steps.ops[sid]
        refs = [r for rs in op.references().values() for r in rs]
        if any(r not in plans for r in refs):
            continue  # an input already failed: its error is reported, not a consequence of it
        try:
            if isinstance(op, LoadOp) and sid not in ckpts:
                ckpts[sid] = open_checkpoint(op.step.model, base_dir=loaded.base_dir, revision=op.step.revision,
                                             allow_pickle=op.step.allow_pickle)
            dtype = _model_dtype(ckpts[steps.kinds[sid].origin]) if isinstance(op, SaveOp) else None
            inputs = PlanInputs({r: plans[r].metas for r in refs}, steps.kinds, ckpts.get(sid), dtype, dict(ckpts))
            plans[sid] = op.plan_step(inputs)
        except MergeEngineError as exc:
            exc.step = exc.step or sid
            failures.append(exc)
    if failures:  # every input problem at once, not one per run
        cls = type(failures[0]) if len({type(f) for f in failures}) == 1 else MergeEngineError
        raise failures[0] if len(failures) == 1 else cls("; ".join(str(f) for f in failures))
    return plans


def _emit_stored_dtypes(steps: StepGraph, active: list[str], plans: dict[str, StepPlan],
                        users: dict[str, list[str]]) -> None:
    """Let a step whose every consumer is a save of one dtype return results in that dtype.

    A merge feeding only ``save(dtype: bfloat16)`` then rounds each chunk once into a bfloat16
    output instead of building a float32 tensor for the save to convert (half the memory, one
    pass less, same bytes).
    """
    for sid in active:
        consumers = users.get(sid, [])
        if not consumers or not all(isinstance(steps.ops[c], SaveOp) for c in consumers):
            continue
        dtypes = {plans[c].emit_dtype for c in consumers}
        if len(dtypes) == 1:
            plans[sid] = steps.ops[sid].emit_in(plans[sid], dtypes.pop())


def _users(steps: StepGraph, active: list[str]) -> dict[str, list[str]]:
    """Step id -> the active steps that reference it (once per reference)."""
    users: dict[str, list[str]] = {}
    for sid in active:
        for refs in steps.ops[sid].references().values():
            for r in refs:
                users.setdefault(r, []).append(sid)
    return users


def _model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point bytes are stored in."""
    totals: dict[torch.dtype, int] = {}
    for info in ckpt.tensors().values():
        if info.dtype.is_floating_point:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    cfg = ckpt.config() or {}
    if ckpt.__class__.__name__ == "GGUFCheckpoint":  # dequantized to float32; store at the config's dtype
        name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return getattr(torch, str(name), torch.float32)
    return max(totals, key=totals.__getitem__) if totals else torch.float32


def _expand(steps: StepGraph, active: list[str], plans: dict[str, StepPlan], roots: list[str]) -> Plan:
    """The task DAG of ``roots``' tensors, its passes and its schedule."""
    tasks = _TaskGraph(steps.ops, plans, active)
    metas = {sid: dict(p.metas) for sid, p in plans.items()}
    save_roots = [r for r in roots if r in metas]
    for r in save_roots:
        for name in sorted(metas[r], key=natural_key):
            tasks.need(r, name, ("", ""), name)
    phase = _phases(tasks.graph)
    graph, sources, phase = _share_statistics_passes(tasks.graph, tasks.sources, phase)
    order = _schedule(graph, phase, list(steps.ops), tasks.anchor)
    save_order = {r: [k.tensor for k in order if k.step == r and k.kind == "compute"] for r in save_roots}
    return Plan(steps, active, plans, metas, graph, order, sources, tasks.reductions, phase, save_order, {})


class _TaskGraph:
    """Builds the task DAG: each needed (step, tensor) once per pass, and each reduction's pass."""

    def __init__(self, ops: dict[str, Op], plans: dict[str, StepPlan], active: list[str]) -> None:
        self.ops, self.plans = ops, plans
        self.graph = nx.DiGraph()
        self.sources: dict[TaskKey, list[TaskKey]] = {}
        self.reductions = {(sid, red.name): red for sid in active for red in ops[sid].reductions(plans[sid])}
        self.anchor: dict[TaskKey, str | None] = {}  # main-pass task -> the output tensor it is computed for

    def _inputs(self, key: TaskKey, pass_of: tuple[str, str], root: str | None = None) -> None:
        """Wire ``key`` to the tasks of its sources (in ``pass_of``'s pass, for output tensor ``root``)."""
        srcs = [self.need(s, n, pass_of, root) for s, n in self.ops[key.step].sources(key.tensor, self.plans[key.step])]
        self.sources[key] = srcs
        for s in srcs:
            self.graph.add_edge(s, key)

    def need(self, step: str, name: str, pass_of: tuple[str, str], root: str | None = None) -> TaskKey:
        """The compute task of ``step``'s tensor ``name`` in the pass feeding ``pass_of`` (main: empty),
        for the output tensor ``root`` (main pass only: a task runs when the tensor it serves is made)."""
        key = self._copy_for(TaskKey(step, name, pass_of=pass_of), root)
        if key in self.graph:
            return key
        self.graph.add_node(key)
        self.anchor[key] = root
        self._inputs(key, pass_of, root)
        waits_for = {step, *self.ops[step].stats_steps(self.plans[step])}
        for (rstep, rname) in self.reductions:
            if rstep in waits_for:
                self.graph.add_edge(self.reduce_node(rstep, rname), key)
        return key

    def _copy_for(self, key: TaskKey, root: str | None) -> TaskKey:
        """``key``, or its copy for output tensor ``root`` when the value is already planned for another one.

        A value two output tensors need (a layer that ``slices`` repeat or move) is computed again
        for the second rather than held in memory from one to the other.
        """
        if key in self.graph and root is not None and self.anchor.get(key) != root:
            return dataclasses.replace(key, copy_for=root)
        return key

    def reduce_node(self, step: str, rname: str) -> TaskKey:
        """The reduce task of ``step``'s reduction ``rname``, with its map tasks and their inputs."""
        key = TaskKey(step, kind="reduce", reduction=rname)
        if key in self.graph:
            return key
        self.graph.add_node(key)
        red = self.reductions[(step, rname)]
        priors = [self.reduce_node(step, a) for a in red.after]
        for p in priors:
            self.graph.add_edge(p, key)
        for name in red.tensors:
            m = TaskKey(step, name, "map", rname)
            self._inputs(m, (step, rname))
            for p in priors:
                self.graph.add_edge(p, m)
            self.graph.add_edge(m, key)
        return key


def _phases(graph: nx.DiGraph) -> dict[TaskKey, int]:
    """Each task's pass: a reduce runs after every reduce it depends on; its pass's tasks with it."""
    rphase: dict[TaskKey, int] = {}
    for k in nx.topological_sort(graph):
        if k.kind == "reduce":
            deps = [a for a in nx.ancestors(graph, k) if a.kind == "reduce"]
            rphase[k] = 1 + max((rphase[a] for a in deps), default=-1)
    main_phase = 1 + max(rphase.values(), default=-1)
    pass_phase = {(k.step, k.reduction): ph for k, ph in rphase.items()}

    def phase_of(k: TaskKey) -> int:
        if k.kind == "reduce":
            return rphase[k]
        return pass_phase.get((k.step, k.reduction) if k.kind == "map" else k.pass_of, main_phase)

    return {k: phase_of(k) for k in graph}


def _share_statistics_passes(graph: nx.DiGraph, sources: dict[TaskKey, list[TaskKey]], phase: dict[TaskKey, int]
                             ) -> tuple[nx.DiGraph, dict[TaskKey, list[TaskKey]], dict[TaskKey, int]]:
    """Statistics passes that run in the same phase share their upstream work: the base model's
    tensors are read once for both experts' DP statistics, not once per reduction."""
    merged = {k: TaskKey(k.step, k.tensor, stats_pass=phase[k] + 1) for k in graph
              if k.kind == "compute" and k.pass_of != ("", "")}
    if not merged:
        return graph, sources, phase
    graph = nx.relabel_nodes(graph, merged, copy=True)
    sources = {merged.get(k, k): [merged.get(s, s) for s in v] for k, v in sources.items()}
    return graph, sources, {merged.get(k, k): ph for k, ph in phase.items()}


def _schedule(graph: nx.DiGraph, phase: dict[TaskKey, int], steps: list[str],
              anchor: dict[TaskKey, str | None]) -> list[TaskKey]:
    """The lexicographic topological order keyed by (pass, tensor, step): each tensor's chain
    finishes before the next tensor's starts (a main-pass task ranks as the output tensor it
    serves, ``anchor``)."""
    names = sorted({k.tensor for k in graph if k.kind != "reduce"}, key=natural_key)
    tensor_rank = {n: i for i, n in enumerate(names)}
    step_rank = {s: i for i, s in enumerate(steps)}
    last = len(names) + 1

    def sort_key(k: TaskKey) -> tuple:  # a main-pass task runs when the output tensor needing it is made
        t = last if k.kind == "reduce" else tensor_rank[anchor.get(k) or k.tensor]
        return (phase[k], t, step_rank[k.step], k.kind == "map")

    return list(nx.lexicographical_topological_sort(graph, key=sort_key))


def uses(plan: Plan) -> dict[TaskKey, int]:
    """How many times each task's value is consumed (a source listed twice counts twice)."""
    count = dict.fromkeys(plan.order, 0)
    for srcs in plan.sources.values():
        for s in srcs:
            count[s] += 1
    return count


def value_bytes(plan: Plan, key: TaskKey) -> int:
    """Bytes a task's result keeps alive (reductions' partials are scalars: counted as 0)."""
    if key.kind != "compute":
        return 0
    return plan.metas[key.step][key.tensor].nbytes


def is_load(plan: Plan, key: TaskKey) -> bool:
    """Whether a task reads tensor data from an input."""
    return key.kind == "compute" and isinstance(plan.ops[key.step], LoadOp)


MAX_PREFETCH_BYTES = 256 << 20


def default_prefetch_bytes(plan: Plan) -> int:
    """Enough read-ahead for one tensor's inputs (the largest bytes loaded for one (pass, tensor)),
    at most :data:`MAX_PREFETCH_BYTES`: the rare huge tensors (embeddings) are not worth the memory."""
    groups: dict[tuple[int, str], int] = {}
    for k in plan.order:
        if is_load(plan, k):
            g = (plan.phase[k], k.tensor)
            groups[g] = groups.get(g, 0) + value_bytes(plan, k)
    return min(max(groups.values(), default=0), MAX_PREFETCH_BYTES)


class PrefetchWindow:
    """Which loads are read ahead, and when: deterministic, so the plan and the executor account
    read-ahead memory identically.

    When the executor needs load ``key``, every load up to it, then further loads in schedule
    order while the bytes read but not yet used stay within ``budget``, are submitted.
    """

    def __init__(self, plan: Plan, budget: int) -> None:
        self.loads = [k for k in plan.order if is_load(plan, k)]
        self.sizes = [value_bytes(plan, k) for k in self.loads]
        self.position = {k: i for i, k in enumerate(self.loads)}
        self.budget = budget
        self.next = 0
        self.ahead = 0  # bytes submitted and not yet taken

    def take(self, key: TaskKey) -> list[TaskKey]:
        """Load ``key`` is needed now: returns the loads to submit (in order), then counts ``key`` as taken."""
        i = self.position[key]
        submit = []
        while self.next < len(self.loads) and (
            self.next <= i or self.ahead + self.sizes[self.next] <= self.budget
        ):
            submit.append(self.loads[self.next])
            self.ahead += self.sizes[self.next]
            self.next += 1
        self.ahead -= self.sizes[i]
        return submit


class LiveBytes:
    """The one memory-accounting rule, shared by :func:`simulate` and the executor.

    A value is live from its task until its last consumer has run (a value nobody consumes, a
    save's result, is handed on and dropped at once); the peak includes the bytes read ahead
    (``window.ahead``). Because the plan and the run apply the same rule to the same schedule,
    the estimate ``plan`` prints is the peak the run measures.
    """

    def __init__(self, plan: Plan, window: PrefetchWindow) -> None:
        self.remaining = uses(plan)
        self.window = window
        self.live = 0
        self.peak = 0

    def produced(self, key: TaskKey, size: int) -> bool:
        """Count ``key``'s new value; returns whether it must be kept (someone consumes it)."""
        self.live += size
        self.peak = max(self.peak, self.live + self.window.ahead)
        if self.remaining[key] == 0:
            self.live -= size
            return False
        return True

    def consumed(self, sources: list[TaskKey], size_of: Callable[[TaskKey], int]) -> list[TaskKey]:
        """A task used ``sources``; returns those whose last consumer it was (now freed)."""
        freed = []
        for src in sources:
            self.remaining[src] -= 1
            if self.remaining[src] == 0:
                self.live -= size_of(src)
                freed.append(src)
        return freed


def simulate(plan: Plan, prefetch_bytes: int = 0) -> Estimate:
    """Walk the schedule with the executor's accounting (:class:`LiveBytes`) and return the exact
    figures. Live bytes include tensors read ahead but not yet used (``prefetch_bytes`` of read-ahead).
    """
    est = Estimate(passes=max(plan.phase.values(), default=0) + 1)
    window = PrefetchWindow(plan, prefetch_bytes)
    live = LiveBytes(plan, window)
    for key in plan.order:
        size = value_bytes(plan, key)
        if is_load(plan, key):
            window.take(key)
            est.bytes_read += size
        live.produced(key, size)
        est.largest_tensor_bytes = max(est.largest_tensor_bytes, size)
        if key.kind == "compute" and isinstance(plan.ops[key.step], SaveOp):
            est.bytes_written += size
            est.tensors_written += 1
        live.consumed(plan.sources.get(key, []), lambda k: value_bytes(plan, k))
    est.peak_live_bytes = live.peak
    return est


def restrict(plan: Plan, skip: dict[str, set[str]]) -> Plan:
    """The same plan without the save tasks in ``skip`` (save step -> tensor names already written)
    and without every task only they needed. Statistics passes stay whole: they read all tensors.

    The order stays a subsequence of the original schedule, so it remains valid.
    """
    if not any(skip.values()):
        return plan
    wanted = [
        k for k in plan.order
        if (k.kind == "compute" and k.step in plan.save_order and k.tensor not in skip.get(k.step, set()))
    ]
    keep: set[TaskKey] = set(wanted)
    for k in wanted:
        keep |= nx.ancestors(plan.graph, k)
    order = [k for k in plan.order if k in keep]
    graph = plan.graph.subgraph(order).copy()
    sources = {k: v for k, v in plan.sources.items() if k in keep}
    new = Plan(plan.steps, plan.active, plan.step_plans, plan.metas, graph, order, sources, plan.reductions,
               {k: plan.phase[k] for k in order}, plan.save_order, plan.checkpoints, plan.save_paths,
               prefetch_bytes=plan.prefetch_bytes)
    new.estimate = simulate(new, new.prefetch_bytes)
    new.estimate.bytes_read_unique = plan.estimate.bytes_read_unique
    return new
