"""Runs a plan: one task at a time in schedule order, freeing every value after its last use.

The executor accounts the bytes of live tensors (the values held between tasks) and reports the
peak; with the same rules, :func:`mergeengine.graph.plan.simulate` predicts it exactly from the
headers.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergeengine.errors import ExecutionError, MergeEngineError, NonFiniteError
from mergeengine.graph.plan import LiveBytes, Plan, PrefetchWindow, TaskKey
from mergeengine.ops.base import TaskContext
from mergeengine.ops.load import LoadOp
from mergeengine.ops.save import SaveOp
from mergeengine.runtime import use_threads

LOG = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a save step's tensors go: a :class:`~mergeengine.io.writer.ShardedWriter` or a dict."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


class DictSink:
    """Collects a save step's tensors in memory (used to build candidates without touching disk)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


@dataclass
class RunStats:
    """What a run did."""

    tensors_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_live_bytes: int = 0
    wall_seconds: float = 0.0
    tasks: int = 0
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)


def execute(
    plan: Plan,
    sinks: dict[str, Sink],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: Callable[[TaskKey, int, int], None] | None = None,
) -> RunStats:
    """Execute every task of ``plan`` in order.

    Args:
        plan: from :func:`mergeengine.graph.plan.build_plan`.
        sinks: save step id -> where its tensors go.
        device: where the math runs; tensors are moved per task, never the whole model.
        seed: the recipe seed (per-tensor generators derive from it).
        allow_nonfinite: accept NaN/Inf in saved tensors.
        progress: called after each task with (task, bytes read by it, bytes written by it).

    Returns:
        Counts, bytes and the peak of live tensor bytes.

    Raises:
        MergeEngineError: with the step and tensor that failed.
    """
    run = _Run(plan, sinks, torch.device(device), seed, allow_nonfinite)
    start = time.perf_counter()
    # Everything alive now (torch's and the plan's objects) lives until the end: move it out of
    # the collector's generations, so the collections the many short-lived tensor objects trigger
    # do not traverse it again and again (~2% of a task_arithmetic run). New cycles are collected;
    # the objects are handed back to the collector when the run ends (see the finally below), so
    # repeated runs (a search) leak nothing that was garbage when a run started.
    gc.freeze()
    try:
        for key in plan.order:
            read, written = run.task(key)
            run.stats.tasks += 1
            if progress is not None:
                progress(key, read, written)
    finally:
        gc.unfreeze()
        run.close()
    run.stats.wall_seconds = time.perf_counter() - start
    run.stats.statistics = run.step_stats
    return run.stats


class _Run:
    """The state of one execution: live values, their accounting, read-ahead and statistics."""

    def __init__(self, plan: Plan, sinks: dict[str, Sink], device: torch.device, seed: int,
                 allow_nonfinite: bool) -> None:
        self.plan, self.sinks, self.device, self.seed = plan, sinks, device, seed
        self.allow_nonfinite = allow_nonfinite
        self.stats = RunStats()
        self.window = PrefetchWindow(plan, plan.prefetch_bytes)
        self.live = LiveBytes(plan, self.window)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if plan.prefetch_bytes else None
        self.reads: dict[TaskKey, Future[torch.Tensor]] = {}
        self.values: dict[TaskKey, Any] = {}
        self.checked: set[TaskKey] = set()  # results their op verified free of NaN/Inf
        self.step_stats: dict[str, dict[str, Any]] = {s: {} for s in plan.active}
        self.accs: dict[tuple[str, str], Any] = {}

    def task(self, key: TaskKey) -> tuple[int, int]:
        """Run one task; returns (bytes it read, bytes it wrote). Errors name the step and tensor."""
        try:
            if key.kind == "reduce":
                self._reduce(key)
                return 0, 0
            inputs = [self.values[s] for s in self.plan.sources[key]]
            if key.kind == "map":
                self._map(key, inputs)
                counts = (0, 0)
            elif isinstance(self.plan.ops[key.step], LoadOp):
                counts = self._load(key)
            else:
                counts = self._compute(key, inputs)
            self._release(key)
            return counts
        except MergeEngineError as exc:
            exc.step = exc.step or key.step
            exc.tensor = exc.tensor or (key.tensor if key.kind != "reduce" else None)
            raise
        except torch.cuda.OutOfMemoryError:
            raise ExecutionError("out of GPU memory; run with --device cpu", step=key.step, tensor=key.tensor) from None
        except Exception as exc:  # an op bug or a torch error: keep the context, one line
            raise ExecutionError(f"{type(exc).__name__}: {exc}", step=key.step, tensor=key.tensor) from exc

    def context(self, key: TaskKey) -> TaskContext:
        """The task's context: the step's plan and statistics."""
        return TaskContext(key.step, key.tensor, self.seed, self.device, self.step_stats.get(key.step, {}),
                           self.plan.step_plans[key.step], stats_of=self.step_stats)

    def _reduce(self, key: TaskKey) -> None:
        name = key.reduction
        red = self.plan.reductions[(key.step, name)]
        acc = self.accs.pop((key.step, name), None)
        self.step_stats[key.step][name] = red.finish(red.initial() if acc is None else acc, self.step_stats[key.step])

    def _map(self, key: TaskKey, inputs: list[Any]) -> None:
        op = self.plan.ops[key.step]
        use_threads(op.is_compute_bound(self.plan.step_plans[key.step]))
        name = key.reduction
        red = self.plan.reductions[(key.step, name)]
        partial = red.map(key.tensor, inputs, self.step_stats[key.step])
        acc = self.accs.get((key.step, name))
        self.accs[(key.step, name)] = red.fold_partial(red.initial() if acc is None else acc, key.tensor, partial)

    def _load(self, key: TaskKey) -> tuple[int, int]:
        for k in self.window.take(key):  # read ahead in the background, bounded
            ctx = self.context(k)
            op = self.plan.ops[k.step]
            self.reads[k] = self.pool.submit(op.compute, [], ctx) if self.pool else _done(op.compute([], ctx))
        out = self.reads.pop(key).result()
        self._hold(key, out)
        self.stats.bytes_read += out.nbytes
        return out.nbytes, 0

    def _compute(self, key: TaskKey, inputs: list[Any]) -> tuple[int, int]:
        op = self.plan.ops[key.step]
        ctx = self.context(key)
        use_threads(op.is_compute_bound(ctx.plan))
        out = self.plan.op_for(key).compute(inputs, ctx)  # scheduled parameters resolved for the tensor
        if ctx.checked_finite:
            self.checked.add(key)
        size = self._hold(key, out)
        if not isinstance(op, SaveOp):
            return 0, 0
        verified = out is inputs[0] and self.plan.sources[key][0] in self.checked
        if not self.allow_nonfinite and out.dtype.is_floating_point and not verified:
            _check_finite(out, op.step.input, key.tensor, lambda: _nonfinite_input(self.plan, key.step, key.tensor))
        self.sinks[key.step].write(key.tensor, out)
        self.stats.bytes_written += size
        self.stats.tensors_written += 1
        return 0, size

    def _hold(self, key: TaskKey, out: Any) -> int:
        """Count a new value as live (:class:`LiveBytes`); keep it while it is used."""
        size = _nbytes(out)
        if self.live.produced(key, size):
            self.values[key] = out
        self.stats.peak_live_bytes = self.live.peak
        return size

    def _release(self, key: TaskKey) -> None:
        """Free every source whose last consumer this was."""
        for s in self.live.consumed(self.plan.sources[key], lambda k: _nbytes(self.values[k])):
            self.values.pop(s)
            self.checked.discard(s)

    def close(self) -> None:
        """Stop reading ahead (also after a failure)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, torch.Tensor) else 0


def _done(value: torch.Tensor) -> Future[torch.Tensor]:
    fut: Future[torch.Tensor] = Future()
    fut.set_result(value)
    return fut


def _check_finite(t: torch.Tensor, step: str, name: str, origin: Callable[[], str | None]) -> None:
    """Raise a :class:`NonFiniteError` when ``t`` holds NaN/Inf; ``origin`` (called only then) says
    which input file already holds them."""
    # Fast path: NaN/Inf propagate into the sum; only a suspicious sum pays for an exact count.
    if torch.isfinite(torch.sum(t, dtype=torch.float32)):  # an overflow to inf only costs the exact count
        return
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        found = origin()
        advice = (f"{found}: fix that input or pass --allow-nonfinite" if found
                  else "check the inputs (NaN/Inf weights?) or pass --allow-nonfinite")
        raise NonFiniteError(f"result has {bad} NaN/Inf value(s) of {t.numel()}; {advice}", step=step, tensor=name)


def _nonfinite_input(plan: Plan, save: str, name: str) -> str | None:
    """The first load step feeding ``save`` whose tensor ``name`` holds NaN/Inf, and its file (read again:
    this runs only on the failure path)."""
    for sid in plan.steps.needed([save]):
        ckpt = plan.checkpoints.get(sid)
        info = ckpt.tensors().get(name) if ckpt is not None else None
        if info is None or not info.dtype.is_floating_point:
            continue
        if not torch.isfinite(ckpt.read(name)).all():
            return f"load step '{sid}' reads NaN/Inf from {info.file or ckpt.source}"
    return None
