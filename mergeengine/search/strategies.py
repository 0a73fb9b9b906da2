"""Search strategies: each is a generator that yields a batch of points and is sent their scores.

A batch never depends on how many workers evaluate it, so a sequential run, a process pool and
Ray ask for the same points in the same order. The optimisation itself is a library's: CMA-ES is
``cma``'s ``CMAEvolutionStrategy`` and TPE is optuna's ``TPESampler``; random draws come from a
seeded numpy ``Generator``; grid is ``itertools.product``. Coordinate ascent is the DPPA release's
rule (see :func:`coordinate`).

Example:
    >>> from mergeengine.search.space import Address
    >>> dims = [Dimension("m.lambda", Address("m", ("lambda",)), choices=(0.5, 1.0))]
    >>> gen = grid(dims)
    >>> next(gen)
    [{'m.lambda': 0.5}, {'m.lambda': 1.0}]
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from mergeengine.errors import MergeEngineError
from mergeengine.search.space import Dimension

Point = dict[str, float]
Strategy = Generator[list[Point], list[float], None]

__all__ = ["Point", "Strategy", "cma_es", "coordinate", "grid", "random_points", "tpe"]


def coordinate(dims: Sequence[Dimension], current: Mapping[str, float], max_steps: int, step_size: float,
               release_start: bool = False) -> Strategy:
    """Coordinate ascent: each dimension in turn, upward by its step while the score strictly improves.

    The increment is the dimension's ``step``, else ``step_size``. A dimension starts at its ``start`` (default: the recipe's value); with ``release_start`` (the
    DPA factors) a start below 0.1 becomes 1.0, as in the release. The last value that improved is
    kept; a range's ``high`` caps the climb. The runner reuses the score of a point seen before.
    """
    point = dict(current)
    for d in dims:
        value = d.start if d.start is not None else point[d.name]
        if release_start and value < 0.1:
            value = 1.0
        point[d.name] = value
        (best,) = yield [dict(point)]
        for _ in range(max_steps):
            trial = round(value + (d.step or step_size), 10)
            if d.high is not None and trial > d.high + 1e-12:
                break
            (s,) = yield [dict(point, **{d.name: trial})]
            if s <= best:
                break
            best, value = s, trial
            point[d.name] = value
    yield [dict(point)]  # the chosen point (already scored: no new trial)


def grid(dims: Sequence[Dimension]) -> Strategy:
    """Every combination of the dimensions' grid values, in one batch (the last dimension fastest)."""
    axes = [d.grid() for d in dims]
    yield [dict(zip([d.name for d in dims], values, strict=True)) for values in itertools.product(*axes)]


def random_points(dims: Sequence[Dimension], trials: int, seed: int) -> Strategy:
    """``trials`` points drawn uniformly (ranges snapped to their step, choices equally likely)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    units = rng.random((trials, len(dims)))
    yield [{d.name: d.from_unit(u) for d, u in zip(dims, row, strict=True)} for row in units]


def _start_units(dims: Sequence[Dimension], current: Mapping[str, float]) -> list[float]:
    return [d.to_unit(d.start if d.start is not None else current[d.name]) for d in dims]


def cma_es(dims: Sequence[Dimension], current: Mapping[str, float], trials: int, seed: int,
           population: int | None) -> Strategy:
    """CMA-ES (``cma``) in the unit cube of the ranges, from the recipe's values, sigma 0.3.

    One generation (``population`` points, cma's default when unset) per batch until ``trials``
    points have been asked. cma draws from numpy's global generator: its state is kept apart, so
    other numpy users in the process neither change nor see the draws.
    """
    cma = _require("cma", "search strategy 'cma' needs the cma package: pip install 'mergeengine[search]'")
    import numpy as np

    outer = np.random.get_state()
    x0 = _start_units(dims, current)
    opts: dict[str, Any] = {"seed": seed + 1, "bounds": [0.0, 1.0], "verbose": -9}  # cma: seed 0 = time
    if population is not None:
        opts["popsize"] = population
    if len(dims) == 1:  # cma optimises two or more dimensions: a dummy one, ignored
        x0 = [*x0, 0.5]
    es = cma.CMAEvolutionStrategy(x0, 0.3, opts)
    own = np.random.get_state()
    np.random.set_state(outer)
    asked = 0
    while asked < trials:
        outer = np.random.get_state()
        np.random.set_state(own)
        xs = es.ask()[: trials - asked]
        own = np.random.get_state()
        np.random.set_state(outer)
        points = [{d.name: d.from_unit(u) for d, u in zip(dims, x, strict=False)} for x in xs]
        scores = yield points
        asked += len(points)
        if len(xs) == es.popsize:
            es.tell(xs, [-s for s in scores])  # cma minimises


def tpe(dims: Sequence[Dimension], trials: int, seed: int, population: int | None) -> Strategy:
    """optuna's TPE sampler (seeded), asked ``population`` points at a time (default 1)."""
    optuna = _require("optuna", "search strategy 'tpe' needs optuna: pip install 'mergeengine[search]'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    dists = {d.name: _distribution(optuna, d) for d in dims}
    asked = 0
    while asked < trials:
        batch = [study.ask(dists) for _ in range(min(population or 1, trials - asked))]
        scores = yield [{d.name: float(t.params[d.name]) for d in dims} for t in batch]
        for t, s in zip(batch, scores, strict=True):
            study.tell(t, s)
        asked += len(batch)


def _distribution(optuna: Any, d: Dimension) -> Any:
    if d.choices is not None:
        return optuna.distributions.CategoricalDistribution(list(d.choices))
    if d.step is not None:
        assert d.low is not None and d.high is not None
        high = d.low + int((d.high - d.low) / d.step + 1e-9) * d.step
        return optuna.distributions.FloatDistribution(d.low, round(high, 10), step=d.step)
    return optuna.distributions.FloatDistribution(d.low, d.high)


def _require(module: str, hint: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MergeEngineError(hint) from None


def make_strategy(name: str, dims: Sequence[Dimension], current: Mapping[str, float], *, trials: int | None,
                  seed: int, population: int | None, max_steps: int, step_size: float,
                  release_start: bool) -> Strategy:
    """The strategy ``name`` over ``dims`` (see each function)."""
    if name == "coordinate":
        return coordinate(dims, current, max_steps, step_size, release_start)
    if name == "grid":
        return grid(dims)
    assert trials is not None
    if name == "random":
        return random_points(dims, trials, seed)
    if name == "cma":
        return cma_es(dims, current, trials, seed, population)
    return tpe(dims, trials, seed, population)


def planned_trials(name: str, dims: Sequence[Dimension], trials: int | None, max_steps: int) -> int:
    """How many trials the strategy plans (coordinate ascent: at most this many)."""
    if name == "grid":
        n = 1
        for d in dims:
            n *= len(d.grid())
        return n
    if name == "coordinate":
        return len(dims) * (max_steps + 1)
    assert trials is not None
    return trials
