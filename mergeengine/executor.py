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
from mergeengine.graph.plan import Plan, PrefetchWindow, TaskKey, uses
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
    dev = torch.device(device)
    stats = RunStats()
    start = time.perf_counter()
    remaining = uses(plan)
    window = PrefetchWindow(plan, plan.prefetch_bytes)
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if plan.prefetch_bytes else None
    reads: dict[TaskKey, Future[torch.Tensor]] = {}
    values: dict[TaskKey, Any] = {}
    checked: set[TaskKey] = set()  # results their op verified free of NaN/Inf
    step_stats: dict[str, dict[str, Any]] = {s: {} for s in plan.active}
    accs: dict[tuple[str, str], Any] = {}
    live = 0
    ops = plan.ops
    # Everything alive now (torch's and the plan's objects) lives until the end: move it out of
    # the collector's generations, so the collections the many short-lived tensor objects trigger
    # do not traverse it again and again (~2% of a task_arithmetic run). New cycles are collected;
    # the objects are handed back to the collector when the run ends (see the finally below), so
    # repeated runs (a search) leak nothing that was garbage when a run started.
    gc.freeze()
    try:
        for key in plan.order:
            op = ops[key.step]
            read = written = 0
            try:
                if key.kind == "reduce":
                    name = key.tensor[1:]
                    red = plan.reductions[(key.step, name)]
                    acc = accs.pop((key.step, name), None)
                    step_stats[key.step][name] = red.finish(red.initial() if acc is None else acc, step_stats[key.step])
                else:
                    inputs = [values[s] for s in plan.sources[key]]
                    if key.kind == "map":
                        use_threads(op.compute_bound)
                        rname = key.pass_.split("/", 1)[1]
                        red = plan.reductions[(key.step, rname)]
                        partial = red.map(key.tensor, inputs, step_stats[key.step])
                        acc = accs.get((key.step, rname))
                        accs[(key.step, rname)] = red.fold_partial(red.initial() if acc is None else acc, key.tensor, partial)
                    elif isinstance(op, LoadOp):
                        for k in window.take(key):  # read ahead in the background, bounded
                            ctx = TaskContext(k.step, k.tensor, seed, dev, {})
                            reads[k] = pool.submit(op_compute, plan.ops[k.step], ctx) if pool else _done(
                                op_compute(plan.ops[k.step], ctx))
                        out = reads.pop(key).result()
                        size = out.nbytes
                        live += size
                        stats.peak_live_bytes = max(stats.peak_live_bytes, live + window.ahead)
                        read = size
                        stats.bytes_read += size
                        values[key] = out
                    else:
                        ctx = TaskContext(key.step, key.tensor, seed, dev, step_stats[key.step], stats_of=step_stats)
                        use_threads(op.compute_bound)
                        out = plan.op_for(key).compute(inputs, ctx)
                        if ctx.checked_finite:
                            checked.add(key)
                        size = out.nbytes if isinstance(out, torch.Tensor) else 0
                        live += size
                        stats.peak_live_bytes = max(stats.peak_live_bytes, live + window.ahead)
                        if isinstance(op, SaveOp):
                            verified = out is inputs[0] and plan.sources[key][0] in checked
                            if not allow_nonfinite and out.dtype.is_floating_point and not verified:
                                _check_finite(out, op.step.input, key.tensor)
                            sinks[key.step].write(key.tensor, out)
                            written = size
                            stats.bytes_written += size
                            stats.tensors_written += 1
                        if remaining[key] > 0:
                            values[key] = out
                        else:
                            live -= size
                    for s in plan.sources[key]:
                        remaining[s] -= 1
                        if remaining[s] == 0:
                            v = values.pop(s)
                            checked.discard(s)
                            live -= v.nbytes if isinstance(v, torch.Tensor) else 0
            except MergeEngineError as exc:
                exc.step = exc.step or key.step
                exc.tensor = exc.tensor or (key.tensor if key.kind != "reduce" else None)
                raise
            except torch.cuda.OutOfMemoryError:
                raise ExecutionError("out of GPU memory; run with --device cpu", step=key.step, tensor=key.tensor) from None
            except Exception as exc:  # an op bug or a torch error: keep the context, one line
                raise ExecutionError(f"{type(exc).__name__}: {exc}", step=key.step, tensor=key.tensor) from exc
            stats.tasks += 1
            if progress is not None:
                progress(key, read, written)
    finally:
        gc.unfreeze()
        if pool is not None:  # stop reading ahead, also after a failure
            pool.shutdown(wait=True, cancel_futures=True)
    stats.wall_seconds = time.perf_counter() - start
    stats.statistics = step_stats
    return stats


def op_compute(op: Any, ctx: TaskContext) -> torch.Tensor:
    """Run a load task (no inputs); used by the read-ahead thread."""
    return op.compute([], ctx)


def _done(value: torch.Tensor) -> Future[torch.Tensor]:
    fut: Future[torch.Tensor] = Future()
    fut.set_result(value)
    return fut


def _check_finite(t: torch.Tensor, step: str, name: str) -> None:
    # Fast path: NaN/Inf propagate into the sum; only a suspicious sum pays for an exact count.
    if torch.isfinite(torch.sum(t, dtype=torch.float32)):  # an overflow to inf only costs the exact count
        return
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise NonFiniteError(
            f"result has {bad} NaN/Inf value(s) of {t.numel()}; check the inputs (NaN/Inf weights?) "
            "or pass --allow-nonfinite",
            step=step,
            tensor=name,
        )
