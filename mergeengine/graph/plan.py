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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import networkx as nx
import torch

from mergeengine.errors import MergeEngineError, RecipeError
from mergeengine.graph.params import TensorParams, resolve_schedules
from mergeengine.graph.steps import StepGraph
from mergeengine.io.checkpoint import Checkpoint
from mergeengine.io.resolve import open_checkpoint
from mergeengine.ops.base import Op, Reduction, TensorMeta
from mergeengine.ops.load import LoadOp
from mergeengine.ops.save import SaveOp

TaskKind = Literal["compute", "map", "reduce"]


@dataclass(frozen=True, order=True)
class TaskKey:
    """One unit of work: a step's tensor in a pass, a reduction's map on a tensor, or a reduce."""

    step: str
    tensor: str
    pass_: str = ""
    kind: TaskKind = "compute"

    def __str__(self) -> str:
        where = f" [{self.pass_}]" if self.pass_ else ""
        return f"{self.kind} {self.step}:{self.tensor}{where}"


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
        metas: step id -> tensor name -> shape/dtype of what the step produces.
        graph: task DAG (edges from producer to consumer).
        order: the schedule.
        sources: task -> the tasks whose values it receives, in the op's order.
        reductions: (step, reduction name) -> Reduction.
        phase: task -> the pass it belongs to (0-based; statistics passes first).
        save_order: save step id -> tensor names in the order they will be written.
        checkpoints: load step id -> opened checkpoint.
        estimate: bytes read/written and peak live memory.
        params: (step, tensor) -> the step's scheduled fields resolved for that tensor.
    """

    steps: StepGraph
    active: list[str]
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
    params: TensorParams = field(default_factory=dict)

    @property
    def ops(self) -> dict[str, Op]:
        return self.steps.ops

    def op_for(self, key: TaskKey) -> Op:
        """The op that computes ``key``: its step's, with scheduled parameters resolved for the tensor."""
        op = self.steps.ops[key.step]
        values = self.params.get((key.step, key.tensor))
        return op if values is None else op.with_params(values)

    def phase_labels(self) -> list[str]:
        """A label per pass, e.g. ``["statistics p_math/module outliers", "merge"]``."""
        n = max(self.phase.values(), default=0) + 1
        labels: list[list[str]] = [[] for _ in range(n)]
        for key, ph in self.phase.items():
            if key.kind == "reduce":
                red = self.reductions[(key.step, key.tensor[1:])]
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
    loaded = steps.loaded
    saves = steps.saves()
    if roots is None:
        roots = saves
        if not saves:
            raise RecipeError([f"{loaded.path}: the recipe has no save step: add one "
                               "(- {id: out, op: save, input: <step>, path: ./merged})"])
    save_paths: dict[str, Path] = {}
    for s in saves:
        p = steps.ops[s].step.path  # type: ignore[attr-defined]
        if p is not None:
            save_paths[s] = (loaded.base_dir / p).resolve()
    if out is not None:
        if len(saves) != 1:
            raise RecipeError([f"{loaded.path}: --out needs exactly one save step, the recipe has {len(saves)}"])
        save_paths[saves[0]] = Path(out).resolve()
    for s in saves:
        if s in roots and s not in save_paths:
            raise RecipeError([f"{loaded.where(('steps',))}: step '{s}': no path: set 'path' or pass --out"])

    active = steps.needed(roots)
    ckpts = dict(checkpoints or {})
    metas: dict[str, dict[str, TensorMeta]] = {}
    failures: list[MergeEngineError] = []
    for sid in active:
        op = steps.ops[sid]
        refs = [r for rs in op.references().values() for r in rs]
        if any(r not in metas for r in refs):
            continue  # an input already failed: its error is reported, not a consequence of it
        try:
            if isinstance(op, LoadOp):
                if sid not in ckpts:
                    ckpts[sid] = open_checkpoint(op.step.model, base_dir=loaded.base_dir, revision=op.step.revision,
                                                 allow_pickle=op.step.allow_pickle)
                op.checkpoint = ckpts[sid]
            if isinstance(op, SaveOp):
                op.set_dtype(_model_dtype(ckpts[steps.kinds[sid].origin]))
            op.bind(ckpts)
            metas[sid] = op.plan_tensors({r: metas[r] for r in refs})
        except MergeEngineError as exc:
            exc.step = exc.step or sid
            failures.append(exc)
            continue
        op.metas = metas[sid]
    if failures:  # every input problem at once, not one per run
        cls = type(failures[0]) if len({type(f) for f in failures}) == 1 else MergeEngineError
        raise failures[0] if len(failures) == 1 else cls("; ".join(str(f) for f in failures))

    for sid in active:  # merges read fine-tunes directly instead of materialised deltas
        fuse = getattr(steps.ops[sid], "fuse_diffs", None)
        if fuse is not None:
            fuse(steps.ops)
    users = _users(steps, active)
    for sid in active:  # ... and amplify them chunk by chunk instead of reading amplified deltas
        fuse = getattr(steps.ops[sid], "fuse_deltas", None)
        if fuse is not None:
            fuse(steps.ops, users)
    _emit_stored_dtypes(steps, active, metas)
    params = resolve_schedules(steps, active)
    plan = _expand(steps, active, metas, roots)
    plan.params = params
    plan.checkpoints = ckpts
    plan.save_paths = save_paths
    plan.prefetch_bytes = default_prefetch_bytes(plan) if prefetch else 0
    plan.estimate = simulate(plan, plan.prefetch_bytes)
    plan.estimate.bytes_read_unique = sum(
        m.nbytes for sid in active if isinstance(steps.ops[sid], LoadOp) for m in metas[sid].values()
    )
    return plan


def _emit_stored_dtypes(steps: StepGraph, active: list[str], metas: dict[str, dict[str, TensorMeta]]) -> None:
    """Let a step whose every consumer is a save of one dtype return results in that dtype.

    A merge feeding only ``save(dtype: bfloat16)`` then rounds each chunk once into a bfloat16
    output instead of building a float32 tensor for the save to convert (half the memory, one
    pass less, same bytes).
    """
    users = _users(steps, active)
    for sid in active:
        emit = getattr(steps.ops[sid], "emit_in", None)
        consumers = [steps.ops[u] for u in users.get(sid, [])]
        if emit is None or not consumers or not all(isinstance(c, SaveOp) for c in consumers):
            continue
        dtypes = {c.out_dtype for c in consumers}  # type: ignore[attr-defined]
        if len(dtypes) == 1:
            metas[sid] = emit(dtypes.pop())


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


def _expand(steps: StepGraph, active: list[str], metas: dict[str, dict[str, TensorMeta]], roots: list[str]) -> Plan:
    ops = steps.ops
    graph = nx.DiGraph()
    sources: dict[TaskKey, list[TaskKey]] = {}
    reductions: dict[tuple[str, str], Reduction] = {}
    for sid in active:
        for red in ops[sid].reductions():
            reductions[(sid, red.name)] = red

    anchor: dict[TaskKey, str | None] = {}  # main-pass task -> the output tensor it is computed for

    def need(step: str, name: str, pass_: str, root: str | None = None) -> TaskKey:
        key = _task_key(graph, anchor, TaskKey(step, name, pass_, "compute"), root)
        if key in graph:
            return key
        graph.add_node(key)
        anchor[key] = root
        srcs = [need(s, n, key.pass_, root) for s, n in ops[step].sources(name)]
        sources[key] = srcs
        for s in srcs:
            graph.add_edge(s, key)
        waits_for = {step, *ops[step].stats_steps()}
        for (rstep, rname) in reductions:
            if rstep in waits_for:
                graph.add_edge(reduce_node(rstep, rname), key)
        return key

    def reduce_node(step: str, rname: str) -> TaskKey:
        key = TaskKey(step, "@" + rname, "", "reduce")
        if key in graph:
            return key
        graph.add_node(key)
        red = reductions[(step, rname)]
        priors = [reduce_node(step, a) for a in red.after]
        for p in priors:
            graph.add_edge(p, key)
        pass_ = f"{step}/{rname}"
        for name in red.tensors:
            m = TaskKey(step, name, pass_, "map")
            srcs = [need(s, n, pass_) for s, n in ops[step].sources(name)]
            sources[m] = srcs
            for s in srcs:
                graph.add_edge(s, m)
            for p in priors:
                graph.add_edge(p, m)
            graph.add_edge(m, key)
        return key

    save_roots = [r for r in roots if r in metas]
    for r in save_roots:
        for name in sorted(metas[r], key=natural_key):
            need(r, name, "", name)

    # Phases: a reduce node runs after every reduce node it depends on.
    rphase: dict[TaskKey, int] = {}
    for k in nx.topological_sort(graph):
        if k.kind == "reduce":
            deps = [a for a in nx.ancestors(graph, k) if a.kind == "reduce"]
            rphase[k] = 1 + max((rphase[a] for a in deps), default=-1)
    main_phase = 1 + max(rphase.values(), default=-1)
    pass_phase = {f"{k.step}/{k.tensor[1:]}": ph for k, ph in rphase.items()}
    phase = {k: (rphase[k] if k.kind == "reduce" else pass_phase.get(k.pass_.split("+")[0], main_phase))
             for k in graph}

    # Statistics passes that run in the same phase share their upstream work: the base model's
    # tensors are read once for both experts' DP statistics, not once per reduction.
    merged = {k: TaskKey(k.step, k.tensor, f"#{phase[k] + 1}") for k in graph if k.kind == "compute" and "/" in k.pass_}
    if merged:
        graph = nx.relabel_nodes(graph, merged, copy=True)
        sources = {merged.get(k, k): [merged.get(s, s) for s in v] for k, v in sources.items()}
        phase = {merged.get(k, k): ph for k, ph in phase.items()}

    names = sorted({k.tensor for k in graph if k.kind != "reduce"}, key=natural_key)
    tensor_rank = {n: i for i, n in enumerate(names)}
    step_rank = {s: i for i, s in enumerate(ops)}
    inf = len(names) + 1

    def sort_key(k: TaskKey) -> tuple:  # a main-pass task runs when the output tensor needing it is made
        t = inf if k.kind == "reduce" else tensor_rank[anchor.get(k) or k.tensor]
        return (phase[k], t, step_rank[k.step], k.kind == "map")

    order = list(nx.lexicographical_topological_sort(graph, key=sort_key))
    save_order = {r: [k.tensor for k in order if k.step == r and k.kind == "compute"] for r in save_roots}
    return Plan(steps, active, metas, graph, order, sources, reductions, phase, save_order, {})


def _task_key(graph: nx.DiGraph, anchor: dict[TaskKey, str | None], key: TaskKey, root: str | None) -> TaskKey:
    """``key``, or its copy for output tensor ``root`` when the value is already planned for another one.

    A value two output tensors need (a layer that ``slices`` repeat or move) is computed again for
    the second (pass id ``PASS+TENSOR``) rather than held in memory from one to the other.
    """
    if key in graph and root is not None and anchor.get(key) != root:
        return TaskKey(key.step, key.tensor, f"{key.pass_}+{root}", key.kind)
    return key


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


def simulate(plan: Plan, prefetch_bytes: int = 0) -> Estimate:
    """Walk the schedule with the executor's accounting rules and return the exact figures.

    Live bytes include tensors read ahead but not yet used (``prefetch_bytes`` of read-ahead).
    """
    est = Estimate(passes=max(plan.phase.values(), default=0) + 1)
    remaining = uses(plan)
    window = PrefetchWindow(plan, prefetch_bytes)
    live = 0
    for key in plan.order:
        size = value_bytes(plan, key)
        if is_load(plan, key):
            window.take(key)
        live += size
        est.peak_live_bytes = max(est.peak_live_bytes, live + window.ahead)
        est.largest_tensor_bytes = max(est.largest_tensor_bytes, size)
        op = plan.ops[key.step]
        if key.kind == "compute" and isinstance(op, LoadOp):
            est.bytes_read += size
        if key.kind == "compute" and isinstance(op, SaveOp):
            est.bytes_written += size
            est.tensors_written += 1
        if remaining[key] == 0:  # a save's result goes to the writer and is dropped
            live -= size
        for src in plan.sources.get(key, []):
            remaining[src] -= 1
            if remaining[src] == 0:
                live -= value_bytes(plan, src)
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
    new = Plan(plan.steps, plan.active, plan.metas, graph, order, sources, plan.reductions,
               {k: plan.phase[k] for k in order}, plan.save_order, plan.checkpoints, plan.save_paths,
               prefetch_bytes=plan.prefetch_bytes, params=plan.params)
    new.estimate = simulate(new, new.prefetch_bytes)
    new.estimate.bytes_read_unique = plan.estimate.bytes_read_unique
    return new
