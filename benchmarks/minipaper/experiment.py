"""The miniature DPPA paper: pruning curves (Table 1) and merges (Table 2) on the tiny CPU models.

    .venv/bin/python benchmarks/minipaper/experiment.py            # full run, writes docs/minipaper.md
    .venv/bin/python benchmarks/minipaper/experiment.py --small    # seconds, for the test suite

Models come from :mod:`train` (cached). Every pruned or merged model is described by a mergeengine
recipe (a dict, shown in the report) and built by :func:`build_tensors`, the one call into the
engine; candidates are built in memory and loaded into one reusable ``LlamaForCausalLM``.

Table 1: each expert pruned with magnitude / DARE / DP / DP+DPA at densities 0.1 .. 0.9, test
accuracy relative to the dense expert. DP+DPA at density d amplifies two partitions (d/2, s1) and
(d, s2), the factors found by the coordinate-ascent search on the validation split.
Table 2: merges of the three experts, per-task accuracy and the geometric mean of relative accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train as train_mod  # noqa: E402

from mergeengine.eval import TaskSpec, evaluate, load_tasks  # noqa: E402

LOG = logging.getLogger("minipaper.experiment")

METHODS = ("magnitude", "dare", "dp", "dp+dpa")
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: DP parameters of the paper's release
DP_PARAMS = {"lamda": 0.08, "module_threshold": 5, "layer_threshold": 3}
#: the release's starting factors of the two DPA partitions
DPA_START = (1.8, 0.0)


# --- recipes -------------------------------------------------------------------------------------


def _delta_steps(name: str, method: str, density: float, factors: tuple[float, ...] | None) -> dict[str, Any]:
    """The step that sparsifies delta ``d_{name}`` with ``method`` (output id ``p_{name}``)."""
    step: dict[str, Any] = {"id": f"p_{name}", "input": f"d_{name}"}
    if method == "magnitude":
        step |= {"op": "magnitude_prune", "density": density}
    elif method == "dare":
        step |= {"op": "dare", "density": density, "rescale": "per_element"}
    elif method == "dp":
        step |= {"op": "dp_prune", "density": density, **DP_PARAMS}
    elif method == "dp+dpa":
        s1, s2 = factors if factors is not None else DPA_START
        step |= {
            "op": "dpa_amplify",
            "select": "dp",
            **DP_PARAMS,
            "partitions": [
                {"density": round(density / 2, 4), "scale": s1},
                {"density": density, "scale": s2},
            ],
            "factors": "release",
            "dense_scale": "max",
        }
    else:
        raise ValueError(f"Unknown method '{method}'. Available: {', '.join(METHODS)}")
    return step


def prune_recipe(
    base: Path,
    expert: Path,
    method: str,
    density: float,
    factors: tuple[float, ...] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recipe of one expert with its delta sparsified: base + sparsify(expert - base)."""
    return {
        "name": f"minipaper-{method}-{density}",
        "seed": seed,
        "steps": [
            {"id": "base", "op": "load", "model": str(base)},
            {"id": "e", "op": "load", "model": str(expert)},
            {"id": "d_e", "op": "diff", "model": "e", "base": "base"},
            _delta_steps("e", method, density, factors),
            {"id": "out", "op": "save", "input": "p_e", "path": "./unused"},
        ],
    }


#: Table 2 rows: label -> (merge method, per-delta sparsifier, density)
MERGES: dict[str, tuple[str, str | None, float | None]] = {
    "task arithmetic": ("task_arithmetic", None, None),
    "TIES 20%": ("ties", None, 0.2),
    "DARE 20% + TA": ("dare_linear", None, 0.2),
    "DARE 20% + TIES": ("dare_ties", None, 0.2),
    "magnitude 20% + TA": ("task_arithmetic", "magnitude", 0.2),
    "DP 20% + TA": ("task_arithmetic", "dp", 0.2),
    "DPPA 20% (DP+DPA) + TA": ("task_arithmetic", "dp+dpa", 0.2),
}


def merge_recipe(
    base: Path,
    experts: dict[str, Path],
    row: str,
    factors: dict[str, tuple[float, ...]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recipe of one Table 2 row: every expert's delta, optionally sparsified, merged onto the base."""
    method, sparsifier, density = MERGES[row]
    steps: list[dict[str, Any]] = [{"id": "base", "op": "load", "model": str(base)}]
    inputs = []
    for name, folder in experts.items():
        steps.append({"id": name, "op": "load", "model": str(folder)})
        steps.append({"id": f"d_{name}", "op": "diff", "model": name, "base": "base"})
        if sparsifier is not None:
            steps.append(_delta_steps(name, sparsifier, density or 1.0, (factors or {}).get(name)))
            inputs.append(f"p_{name}")
        else:
            inputs.append(f"d_{name}")
    merge: dict[str, Any] = {
        "id": "merged",
        "op": "merge",
        "method": method,
        "base": "base",
        "inputs": inputs,
    }
    if sparsifier is None and density is not None:
        merge["density"] = density
    if method == "ties":
        merge |= {"trim_scope": "tensor", "vote": "unweighted"}
    elif method == "dare_ties":
        merge |= {"vote": "unweighted"}
    steps += [merge, {"id": "out", "op": "save", "input": "merged", "path": "./unused"}]
    return {"name": f"minipaper-merge-{method}", "seed": seed, "steps": steps}


# --- the one call into the engine ---------------------------------------------------------------------


def build_tensors(recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run ``recipe`` and return the tensors of its save step ``out`` (in memory, float32).

    The engine's in-memory path (no disk round trip), as the DPA search needs.
    """
    from mergeengine import api

    return api.build_in_memory(yaml.safe_dump(recipe, sort_keys=False), "out")


# --- evaluation of candidates ----------------------------------------------------------------------


@dataclass
class Evaluator:
    """One reusable model: load a candidate's tensors, evaluate on task specs (accuracy only)."""

    template: Path
    batch_size: int
    model: Any = None
    tokenizer: Any = None
    builds: int = 0
    build_seconds: float = 0.0
    eval_seconds: float = 0.0

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(self.template, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(self.template)

    def accuracy(self, recipe: dict[str, Any], specs: list[TaskSpec]) -> dict[str, float]:
        """Build ``recipe`` and return {task: accuracy} on ``specs``."""
        t0 = time.perf_counter()
        tensors = build_tensors(recipe)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"candidate does not fit the model: missing {missing}, unexpected {unexpected}"
            )
        t1 = time.perf_counter()
        result = evaluate(self.model, self.tokenizer, specs, batch_size=self.batch_size, loglik=False)
        self.builds += 1
        self.build_seconds += t1 - t0
        self.eval_seconds += time.perf_counter() - t1
        return {t.name: t.accuracy for t in result.tasks}


def relative_score(accuracy: dict[str, float], references: dict[str, float]) -> float:
    """Geometric mean over tasks of accuracy / reference (0 if any task scores 0)."""
    ratios = [accuracy[t] / references[t] for t in accuracy]
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


@dataclass
class SearchResult:
    """Outcome of :func:`search_factors`: the best factors, their score, and every trial."""

    factors: tuple[float, ...]
    score: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def search_factors(
    score: Callable[[tuple[float, ...]], float],
    initial: tuple[float, ...],
    *,
    step: float = 0.1,
    max_trials: int = 40,
) -> SearchResult:
    """The DPA coordinate ascent (docs: DPPA.md, "The search for the factors").

    For each factor in order: a factor that starts below 0.1 starts at 1.0; while the score
    improves, add ``step``; the first non-improving candidate is dropped (the factor steps back).
    Every (factors, score) pair tried is recorded.
    """
    trials: list[dict[str, Any]] = []

    def trial(f: list[float]) -> float:
        s = score(tuple(f))
        trials.append({"factors": [round(x, 4) for x in f], "score": s})
        return s

    factors = list(initial)
    best = trial(factors)
    for k in range(len(factors)):
        if factors[k] < 0.1:
            factors[k] = 1.0
            best = trial(factors)
        while len(trials) < max_trials:
            candidate = factors.copy()
            candidate[k] = round(candidate[k] + step, 4)
            s = trial(candidate)
            if s > best:
                factors, best = candidate, s
            else:
                break
    return SearchResult(tuple(factors), best, trials)


def search_prune_factors(
    ev: Evaluator, base: Path, expert: Path, density: float, spec: TaskSpec, reference: float
) -> SearchResult:
    """DPA factors of one pruned expert, maximising validation accuracy / dense accuracy."""

    def score(factors: tuple[float, ...]) -> float:
        recipe = prune_recipe(base, expert, "dp+dpa", density, factors)
        return ev.accuracy(recipe, [spec])[spec.name] / reference

    return search_factors(score, DPA_START)


def search_merge_factors(
    ev: Evaluator,
    base: Path,
    experts: dict[str, Path],
    row: str,
    specs: list[TaskSpec],
    references: dict[str, float],
) -> SearchResult:
    """DPA factors of every expert of a merge (two each, in expert order), maximising the relative score."""
    names = list(experts)

    def score(flat: tuple[float, ...]) -> float:
        factors = {n: flat[2 * i : 2 * i + 2] for i, n in enumerate(names)}
        return relative_score(ev.accuracy(merge_recipe(base, experts, row, factors), specs), references)

    return search_factors(score, DPA_START * len(names))


# --- tables -------------------------------------------------------------------------------------------


def table1(summary: dict[str, Any], ev: Evaluator, densities: tuple[float, ...]) -> dict[str, Any]:
    """Pruning curves: {task: {method: {density: {...}}}}."""
    base = Path(summary["paths"]["base"])
    val = {t.name: t for t in load_tasks(summary["paths"]["tasks_val"]).tasks}
    test = {t.name: t for t in load_tasks(summary["paths"]["tasks_test"]).tasks}
    out: dict[str, Any] = {}
    for task, expert in summary["paths"]["experts"].items():
        expert = Path(expert)
        ref_test, ref_val = test[task].reference, val[task].reference
        out[task] = {}
        for method in METHODS:
            out[task][method] = {}
            for d in densities:
                row: dict[str, Any] = {}
                if method == "dp+dpa":
                    search = search_prune_factors(ev, base, expert, d, val[task], ref_val)
                    row |= {
                        "factors": list(search.factors),
                        "val_relative": search.score,
                        "trials": search.trials,
                    }
                    recipe = prune_recipe(base, expert, method, d, search.factors)
                else:
                    recipe = prune_recipe(base, expert, method, d)
                acc = ev.accuracy(recipe, [test[task]])[task]
                row |= {"accuracy": acc, "relative": acc / ref_test}
                out[task][method][str(d)] = row
                LOG.info(
                    "table1 %s %s %.1f: accuracy %.3f (relative %.3f)", task, method, d, acc, acc / ref_test
                )
    return out


def table2(summary: dict[str, Any], ev: Evaluator) -> dict[str, Any]:
    """Merges of all experts: {row: {"accuracy": {task: acc}, "relative": geo-mean, ...}}."""
    base = Path(summary["paths"]["base"])
    experts = {t: Path(p) for t, p in summary["paths"]["experts"].items()}
    val_specs = load_tasks(summary["paths"]["tasks_val"]).tasks
    test_specs = load_tasks(summary["paths"]["tasks_test"]).tasks
    val_refs = {t.name: t.reference for t in val_specs}
    test_refs = {t.name: t.reference for t in test_specs}
    out: dict[str, Any] = {}
    for row, (_, sparsifier, _) in MERGES.items():
        entry: dict[str, Any] = {}
        factors = None
        if sparsifier == "dp+dpa":
            names = list(experts)
            search = search_merge_factors(ev, base, experts, row, val_specs, val_refs)
            factors = {n: search.factors[2 * i : 2 * i + 2] for i, n in enumerate(names)}
            entry |= {
                "factors": {n: list(f) for n, f in factors.items()},
                "val_relative": search.score,
                "trials": search.trials,
            }
        acc = ev.accuracy(merge_recipe(base, experts, row, factors), test_specs)
        entry |= {"accuracy": acc, "relative": relative_score(acc, test_refs)}
        out[row] = entry
        LOG.info("table2 %s: %s relative %.3f", row, acc, entry["relative"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``experiment.py [--small] [--threads N] [--cache-dir DIR] [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=train_mod.DEFAULT_CACHE)
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="results JSON (default: the run's cache folder)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mergeengine").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = train_mod.small_config() if args.small else train_mod.ExperimentConfig()
    t0 = time.perf_counter()
    summary = train_mod.run(cfg, args.cache_dir)
    ev = Evaluator(Path(summary["paths"]["base"]), cfg.eval_batch_size)
    densities = (0.2, 0.6) if args.small else DENSITIES
    results = {"table1": table1(summary, ev, densities), "table2": table2(summary, ev), "train": summary}
    results["seconds"] = {
        "total": time.perf_counter() - t0,
        "build": ev.build_seconds,
        "eval": ev.eval_seconds,
        "builds": ev.builds,
    }
    out_dir = args.out_dir or Path(summary["paths"]["tasks_test"]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    LOG.info("wrote %s", out_dir / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
