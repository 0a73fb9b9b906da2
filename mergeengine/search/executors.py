"""Where trials run: in this process, in a local process pool, or as Ray tasks.

Every executor takes a batch of :class:`TrialJob` and yields their outcomes as they finish (in
any order; the runner puts them back in trial order). Workers keep their evaluator between trials,
so the model skeleton and the tasks are set up once per worker, not once per trial.

- :class:`InProcess`: one trial after another, here.
- :class:`Pool`: ``concurrent.futures.ProcessPoolExecutor`` whose workers fork from a forkserver
  that imported torch, transformers and lm-eval once (never from this process, whose torch threads
  may be running), each running ``cores // workers`` torch threads; with CUDA, worker ``k`` uses
  GPU ``k % device_count``.
- :class:`RayTasks`: one Ray task per trial (``num_cpus=1``, ``num_gpus=1`` when the cluster has
  GPUs); a local Ray started here (``--ray``) is shut down at the end, an existing one
  (``--ray ADDRESS``, or ``ray.init`` done by the caller) is left running. The cluster's nodes need
  mergeengine installed and the recipe's models at the same paths (a shared filesystem).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from typing import Any

from mergeengine.errors import MergeEngineError
from mergeengine.search import trial as trial_mod
from mergeengine.search.trial import TrialJob, TrialOutcome, run_trial

RAY_HINT = "--ray needs Ray: pip install 'mergeengine[ray]'"
#: what pool workers import before their first trial (a missing optional one is skipped)
PRELOAD = ["mergeengine.search.trial", "mergeengine.api", "transformers", "lm_eval.evaluator",
           "lm_eval.models.huggingface"]


class InProcess:
    """Trials one after another in this process."""

    workers = 1
    kind = "sequential"

    def run(self, jobs: Sequence[TrialJob]) -> Iterator[TrialOutcome]:
        """Run each job in turn."""
        for job in jobs:
            yield run_trial(job)

    def close(self) -> None:
        """Nothing to release."""


def portable_trial(job: TrialJob) -> TrialOutcome:
    """:func:`run_trial` for another process: an error comes back as a plain, picklable one-line error.

    (A :class:`MergeEngineError` subclass with its own constructor, or the step and file it
    carries as keywords, would not survive pickling; its rendered line does.)
    """
    try:
        return run_trial(job)
    except MergeEngineError as exc:
        raise MergeEngineError(str(exc)) from None


def _init_worker(threads: int, devices: Any) -> None:
    from mergeengine.runtime import set_threads

    set_threads(threads)
    if devices is not None:
        trial_mod.WORKER_DEVICE = devices.get()


class Pool:
    """A local pool of ``workers`` processes, forked from a forkserver."""

    kind = "pool"

    def __init__(self, workers: int, device: str) -> None:
        self.workers = workers
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # imported once in the server, then each worker forks from it
        devices = None
        if device.startswith("cuda"):
            import torch

            devices = ctx.Manager().Queue()
            for k in range(workers):
                devices.put(f"cuda:{k % max(1, torch.cuda.device_count())}")
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(threads, devices))

    def run(self, jobs: Sequence[TrialJob]) -> Iterator[TrialOutcome]:
        """Submit every job; yield outcomes as they finish."""
        futures = [self.pool.submit(portable_trial, job) for job in jobs]
        try:
            for f in cf.as_completed(futures):
                yield f.result()
        finally:
            for f in futures:
                f.cancel()

    def close(self) -> None:
        """Stop the workers (queued trials are cancelled)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayTasks:
    """One Ray task per trial, on a local Ray or an existing cluster."""

    kind = "ray"

    def __init__(self, address: str | None, workers: int | None) -> None:
        try:
            import ray
        except ImportError:
            raise MergeEngineError(RAY_HINT) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None and workers:
                kwargs["num_cpus"] = workers
            ray.init(address=address, **kwargs)
        resources = ray.cluster_resources()
        self.gpus = resources.get("GPU", 0) > 0
        self.workers = int(resources.get("GPU" if self.gpus else "CPU", 1))
        self.task = ray.remote(num_cpus=1, num_gpus=1 if self.gpus else 0, max_retries=0)(portable_trial)

    @property
    def device(self) -> str:
        """``cuda`` (the GPU Ray assigned to the task) on a cluster with GPUs, else ``cpu``."""
        return "cuda" if self.gpus else "cpu"

    def run(self, jobs: Sequence[TrialJob]) -> Iterator[TrialOutcome]:
        """Submit every job as a task; yield outcomes as they finish."""
        ray = self.ray
        pending = [self.task.remote(job) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    yield ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause
                    if isinstance(cause, MergeEngineError):
                        raise cause from None
                    raise MergeEngineError(f"search: a Ray trial failed: {cause!r}") from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut down the local Ray started here; leave an existing cluster running."""
        if self.started:
            self.ray.shutdown()


def make_executor(workers: int, ray: str | None, device: str) -> InProcess | Pool | RayTasks:
    """``ray`` ("local" or an address) -> :class:`RayTasks`; ``workers > 1`` -> :class:`Pool`; else in process."""
    if ray is not None:
        return RayTasks(None if ray == "local" else ray, workers if workers > 1 else None)
    if workers > 1:
        return Pool(workers, device)
    return InProcess()
