"""The search driver: a strategy asks for points, an executor scores them, the log records each trial.

score = geometric mean over tasks of (score / the dense fine-tuned model's score), the release's
normalisation. Each point is a trial once: a point asked again reuses its score. Trials are
numbered in the order the strategy asks for them, whatever order they finish in, so sequential,
pool and Ray runs give the same trials and the same best.

The log (``search.jsonl``) gets one JSON line per finished trial (``trial``, ``params``,
``task_scores``, ``score``, ``wall_s``, ``worker``) as it finishes; ``resume`` reads it back and
replays those trials instead of running them again (the strategy is deterministic, so it asks for
the same points; a log that does not match is an error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeengine.errors import MergeEngineError
from mergeengine.io.output_guard import write_text_atomic
from mergeengine.recipe.loader import LoadedRecipe, load_recipe
from mergeengine.search.executors import make_executor
from mergeengine.search.space import Dimension, apply_point, current_values, dimensions
from mergeengine.search.strategies import Point, make_strategy, planned_trials
from mergeengine.search.trial import TrialJob, TrialOutcome

LOG = logging.getLogger(__name__)


@dataclass
class Trial:
    """One evaluated candidate.

    Attributes:
        index: its number (0-based, in the order the strategy asked).
        params: the point (address -> value).
        task_scores: each task's raw score.
        score: the normalised geometric mean (the objective).
        wall_s: build + evaluation time in its worker.
        worker: ``host:pid`` of the worker.
        factors: every dpa_amplify step's partition scales in this candidate.
    """

    index: int
    params: dict[str, float]
    task_scores: dict[str, float]
    score: float
    wall_s: float = 0.0
    worker: str = ""
    factors: dict[str, list[float]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The log line's fields."""
        return {"trial": self.index, "params": self.params, "task_scores": self.task_scores,
                "score": self.score, "wall_s": self.wall_s, "worker": self.worker}


@dataclass
class SearchResult:
    """Every trial, the best one and the recipe that reruns without searching."""

    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    references: dict[str, float] = field(default_factory=dict)

    @property
    def best_params(self) -> dict[str, float]:
        """The chosen point."""
        return dict(self.best.params) if self.best else {}

    @property
    def best_score(self) -> float:
        """The chosen point's score."""
        return self.best.score if self.best else 0.0

    @property
    def best_factors(self) -> dict[str, list[float]]:
        """The chosen candidate's DPA partition scales, per dpa_amplify step."""
        return self.best.factors if self.best else {}

    def to_jsonl(self) -> str:
        """One JSON line per trial, in trial order."""
        return "".join(json.dumps(t.record()) + "\n" for t in self.trials)


def geometric_score(accuracies: dict[str, float], references: dict[str, float]) -> float:
    """Geometric mean of score / reference over the tasks (0 when any task scores 0).

    Raises:
        MergeEngineError: a task has no reference score.
    """
    missing = [t for t in accuracies if not references.get(t)]
    if missing:
        raise MergeEngineError(f"search: no reference score for task(s) {', '.join(missing)}: add "
                               "'reference' in the task file or 'references' in the search block")
    ratios = [accuracies[t] / references[t] for t in accuracies]
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _factors_of(raw: dict[str, Any]) -> dict[str, list[float]]:
    return {s["id"]: [float(p["scale"]) for p in s["partitions"]] for s in raw["steps"] if s.get("op") == "dpa_amplify"}


def point_key(point: Point) -> str:
    """A point's identity (rounded, so 0.30000000000000004 and 0.3 are one point)."""
    return json.dumps({k: round(float(v), 10) for k, v in sorted(point.items())})


class TrialLog:
    """``search.jsonl``: appended per finished trial; read back on resume."""

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.finished: dict[int, dict[str, Any]] = {}
        if path is None:
            return
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.finished[int(rec["trial"])] = rec
            # rewrite what was read, so a cut line is not left in the middle of the log
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.finished.values()))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def append(self, trial: Trial) -> None:
        """Append one trial's line and flush it to disk."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(trial.record()) + "\n")
            f.flush()


class _Driver:
    """Runs batches of points through an executor, with the log, the progress bar and the score cache."""

    def __init__(self, loaded: LoadedRecipe, dims: Sequence[Dimension], log: TrialLog, executor: Any,
                 device: str, bar: Any) -> None:
        spec = loaded.recipe.search
        assert spec is not None
        self.loaded, self.dims, self.log, self.executor, self.bar = loaded, dims, log, executor, bar
        self.device = getattr(executor, "device", device)
        self.spec_json = spec.model_dump_json(by_alias=True)
        self.references = _references(loaded, executor, self.device, self.spec_json)
        self.trials: list[Trial] = []
        self.by_key: dict[str, Trial] = {}
        self.raws: dict[int, dict[str, Any]] = {}
        self.best_seen = -math.inf

    def scores(self, batch: Sequence[Point]) -> list[float]:
        """The score of each point: from the cache, the resumed log, or a new trial."""
        jobs = []
        for point in batch:
            key = point_key(point)
            if key in self.by_key or any(point_key(j.params) == key for j in jobs):
                continue
            index = len(self.trials) + len(jobs)
            raw = apply_point(self.loaded, self.dims, point)
            self.raws[index] = raw
            job = TrialJob(index, {k: round(float(v), 10) for k, v in point.items()},
                           yaml.safe_dump(raw, sort_keys=False), self.loaded.path, self.spec_json, self.device)
            jobs.append(job)
        done = {o.index: o for o in self._run(jobs)}
        for job in jobs:
            self._add(self._trial(done[job.index]), job)
        return [self.by_key[point_key(p)].score for p in batch]

    def _run(self, jobs: list[TrialJob]) -> Iterator[TrialOutcome]:
        todo = []
        for job in jobs:
            rec = self.log.finished.get(job.index)
            if rec is None:
                todo.append(job)
                continue
            if point_key(rec["params"]) != point_key(job.params):
                raise MergeEngineError(f"search: trial {job.index} in {self.log.path} has other parameters than "
                                       "this search asks for (the recipe changed?): remove the log to start afresh")
            self.best_seen = max(self.best_seen, float(rec["score"]))
            yield TrialOutcome(job.index, job.params, rec["task_scores"], rec["wall_s"], rec["worker"])
        for outcome in self.executor.run(todo):
            trial = self._trial(outcome)
            self.log.append(trial)
            self._progress(trial)
            yield outcome

    def _trial(self, o: TrialOutcome) -> Trial:
        return Trial(o.index, o.params, o.task_scores, geometric_score(o.task_scores, self.references),
                     o.wall_s, o.worker, _factors_of(self.raws[o.index]))

    def _add(self, trial: Trial, job: TrialJob) -> None:
        self.trials.append(trial)
        self.by_key[point_key(job.params)] = trial

    def _progress(self, trial: Trial) -> None:
        LOG.info("search trial %d: %s -> score %.4f %s", trial.index, trial.params, trial.score, trial.task_scores)
        self.best_seen = max(self.best_seen, trial.score)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{self.best_seen:.4f}")


def _references(loaded: LoadedRecipe, executor: Any, device: str, spec_json: str) -> dict[str, float]:
    """Dense scores per task: numbers from ``references``, the named experts' scores (each evaluated
    once, in parallel), else the JSONL task file's ``reference``.

    Raises:
        MergeEngineError: a JSONL task has no reference at all.
    """
    spec = loaded.recipe.search
    assert spec is not None
    refs = {t: float(r) for t, r in spec.references.items() if not isinstance(r, str)}
    experts = sorted({r for r in spec.references.values() if isinstance(r, str)})
    jobs = [TrialJob(-1 - i, {}, yaml.safe_dump(reference_recipe(loaded, sid), sort_keys=False), loaded.path,
                     spec_json, device) for i, sid in enumerate(experts)]
    scores = {experts[-1 - o.index]: o.task_scores for o in executor.run(jobs)}
    for task, ref in spec.references.items():
        if isinstance(ref, str):
            if task not in scores[ref]:
                raise MergeEngineError(f"search: references: the tasks have no '{task}' (they have "
                                       f"{', '.join(scores[ref])})")
            refs[task] = scores[ref][task]
            LOG.info("search reference: %s on %s = %.4f", ref, task, refs[task])
    if isinstance(spec.tasks, str):
        from mergeengine.eval import load_tasks

        path = Path(spec.tasks).expanduser()
        tasks = load_tasks(path if path.is_absolute() else loaded.base_dir / path)
        for t in tasks.tasks:
            refs.setdefault(t.name, t.reference)  # type: ignore[arg-type]
        missing = [t.name for t in tasks.tasks if not refs.get(t.name)]
        if missing:
            geometric_score(dict.fromkeys(missing, 0.0), refs)  # raises the usual message
    return refs


def reference_recipe(loaded: LoadedRecipe, step: str) -> dict[str, Any]:
    """A recipe that saves the load step ``step`` as it is (the dense expert), under the target's name."""
    spec = loaded.recipe.search
    assert spec is not None
    target = spec.target or next(s.id for s in loaded.recipe.steps if s.op == "save")
    load = next(s for s in loaded.raw["steps"] if s.get("id") == step)
    return {"seed": loaded.raw.get("seed", 0),
            "steps": [dict(load), {"id": target, "op": "save", "input": step, "path": "reference"}]}


def run_search(
    recipe: str | Path | LoadedRecipe,
    *,
    device: str = "cpu",
    progress: bool = False,
    workers: int = 1,
    ray: str | None = None,
    log: str | Path | None = None,
    resume: bool = False,
    executor: Any = None,
) -> SearchResult:
    """Run the recipe's ``search`` block.

    Args:
        recipe: a recipe file (or loaded recipe) with a ``search`` block.
        device: where candidates are built and evaluated (``cuda``: one GPU per pool worker / Ray task).
        progress: a tqdm bar (trials done / planned, best score so far) and one INFO line per trial.
        workers: trials at once in a local process pool (1: in this process).
        ray: ``"local"`` (start a local Ray) or a Ray address; Ray tasks instead of the pool.
        log: the ``search.jsonl`` to append each finished trial to (``None``: no log).
        resume: reuse the trials already in ``log``.
        executor: an executor from :func:`mergeengine.search.executors.make_executor` to reuse (its
            workers stay warm between searches; the caller closes it); ``workers`` and ``ray`` are then ignored.

    Returns:
        All trials, the best one, and the resolved recipe (no search block).

    Raises:
        MergeEngineError: no search block, no reference scores, or a build/evaluation failure.

    Example:
        >>> result = run_search("recipe.yaml", workers=2, log="recipe.search.jsonl")  # doctest: +SKIP
        >>> result.best_params, result.best_score  # doctest: +SKIP
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    spec = loaded.recipe.search
    if spec is None:
        raise MergeEngineError(f"{loaded.path}: the recipe has no 'search' block")
    from mergeengine.api import validate

    validate(loaded)
    dims = dimensions(loaded)
    strategy = make_strategy(spec.strategy, dims, current_values(loaded, dims), trials=spec.trials,
                             seed=spec.seed, population=spec.population, max_steps=spec.max_steps,
                             step_size=spec.step_size, release_start=bool(spec.factors))
    with _log_lock(Path(log) if log is not None else None):
        trial_log = TrialLog(Path(log) if log is not None else None, resume)
        bar = _progress_bar(spec, dims, len(trial_log.finished)) if progress else None
        owned = executor is None
        executor = make_executor(workers, ray, device) if owned else executor
        try:
            driver = _Driver(loaded, dims, trial_log, executor, device, bar)
            last = _drive(strategy, driver)
        finally:  # also on a failed or interrupted trial
            if owned:
                executor.close()
            if bar is not None:
                bar.close()
    return _result(loaded, dims, driver, last)


@contextlib.contextmanager
def _log_lock(log: Path | None) -> Iterator[None]:
    """One search per trial log: a second one would truncate and interleave it (``.NAME.lock``, as a run's).

    Raises:
        OutputError: another search holds the log.
    """
    if log is None:
        yield
        return
    from mergeengine.io.output_guard import RunLock

    log.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(log):
        yield


def _progress_bar(spec: Any, dims: Sequence[Dimension], done: int) -> Any:
    """Trials done / planned (coordinate ascent: at most planned), the best score in the postfix."""
    from tqdm.auto import tqdm

    planned = planned_trials(spec.strategy, dims, spec.trials, spec.max_steps)
    return tqdm(total=planned, desc="search", unit="trial", initial=done)


def _drive(strategy: Any, driver: _Driver) -> list[Point]:
    """Feed the strategy its scores until it stops; the last batch it asked for."""
    batch = next(strategy)
    while True:
        scores = driver.scores(batch)
        try:
            batch_next = strategy.send(scores)
        except StopIteration:
            return batch
        batch = batch_next


def _result(loaded: LoadedRecipe, dims: Sequence[Dimension], driver: _Driver, last: list[Point]) -> SearchResult:
    spec = loaded.recipe.search
    assert spec is not None
    trials = sorted(driver.trials, key=lambda t: t.index)
    if spec.strategy == "coordinate":  # the point the climb settled on
        best = driver.by_key[point_key(last[-1])]
    else:  # the highest score, the earliest trial on ties
        best = max(trials, key=lambda t: (t.score, -t.index))
    return SearchResult(trials, best, apply_point(loaded, dims, best.params), driver.references)


def default_paths(loaded: LoadedRecipe, out: Path | None = None) -> tuple[Path, Path]:
    """``<recipe>.resolved.yaml`` (or ``out``) and ``<recipe>.search.jsonl`` beside it."""
    base = Path(loaded.path)
    resolved = out or base.with_name(base.stem + ".resolved.yaml")
    return resolved, resolved.with_name(base.stem + ".search.jsonl")


def write_search_outputs(loaded: LoadedRecipe, result: SearchResult, out: Path | None = None,
                         log_written: bool = False) -> tuple[Path, Path]:
    """Write the resolved recipe (reruns without searching) and, unless already written, the trial log,
    each whole or not at all.

    Returns:
        The resolved recipe's path and the log's.
    """
    base = Path(loaded.path)
    resolved, log = default_paths(loaded, out)
    header = (f"# Resolved by `mergeengine search {base.name}`: {json.dumps(result.best_params)}, "
              f"validation score {result.best_score:.4f} after {len(result.trials)} trials.\n")
    write_text_atomic(resolved, header + yaml.safe_dump(result.resolved, sort_keys=False))
    if not log_written:
        write_text_atomic(log, result.to_jsonl())
    return resolved, log


__all__ = ["SearchResult", "Trial", "default_paths", "geometric_score", "run_search",
           "write_search_outputs"]
