"""Tables 1 and 2 of :mod:`experiment`, with the λ grids and DPA searches swept in memory.

Same recipes, same protocol and same result layout as :func:`experiment.table1` and
:func:`experiment.table2`; only how a validation candidate is made differs (see :mod:`linear`):
each method's delta is built once by mergeengine and every λ of the grid, and every trial of the
DPA factor search (:func:`mergeengine.search.run_search` with a :class:`linear.LinearExecutor`),
is a linear combination of such deltas written into the evaluation model. The chosen recipe is
then built for real: its test accuracy is the number reported, and each choice records a
``check``: the largest difference between the in-memory candidate and the build, and the
validation accuracy of both.
"""

from __future__ import annotations

import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiment as exp  # noqa: E402
import linear  # noqa: E402

from mergeengine.recipe.loader import parse_recipe  # noqa: E402
from mergeengine.search import SearchResult, run_search  # noqa: E402

LOG = logging.getLogger("minipaper.sweep")
ComponentKey = tuple[str, tuple[float, ...]]


@dataclass
class Sweeper:
    """One evaluation model, the base's tensors and the components built so far."""

    ctx: exp.Context
    ev: exp.Evaluator
    settings: exp.RunSettings
    models: linear.LinearModels = field(init=False)
    components: dict[ComponentKey, tuple[linear.Component, linear.Component]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.models = linear.LinearModels(self.ev.model, self.ctx.base)

    # --- building blocks ---------------------------------------------------------------------------

    def scored(self, terms: linear.Terms, specs: list[Any]) -> dict[str, float]:
        """Accuracy of the in-memory candidate ``base + Σ c · component`` on ``specs``."""
        self.models.load(terms)
        return self.ev.score(specs)

    def built_delta(self, recipe: dict[str, Any]) -> linear.Component:
        """``build(recipe) - base``: a delta made by mergeengine."""
        return self.models.component(self.ev.build(recipe))

    def dpa_components(self, experts: dict[str, Path], density: float) -> None:
        """Build (once) the A and B components of each expert's DP+DPA delta at ``density``."""
        for name, folder in experts.items():
            step = exp.sparsify_step(name, "dpa_release", density)
            steps = {"base": {"id": "base", "op": "load", "model": str(self.ctx.base)},
                     name: {"id": name, "op": "load", "model": str(folder)},
                     f"d_{name}": {"id": f"d_{name}", "op": "diff", "model": name, "base": "base"}}
            key = linear.dpa_key(steps, step)
            if key in self.components:
                continue
            parts = []
            for part in linear.component_steps(step):
                recipe = {"name": f"minipaper-dpa-component-{name}-{density}", "seed": 0,
                          "steps": [*steps.values(), part, {"id": "out", "op": "save", "input": part["id"], "path": "./out"}]}
                parts.append(self.built_delta(recipe))
            self.components[key] = (parts[0], parts[1])

    def search(self, recipe: dict[str, Any]) -> SearchResult:
        """The engine's DPA factor search on ``recipe`` (with its ``search:`` block), trials in memory."""
        executor = linear.LinearExecutor(self.models, self.ev.tokenizer, self.components)
        return run_search(parse_recipe(yaml.safe_dump(recipe, sort_keys=False)), executor=executor)

    def final(self, where: str, recipe: dict[str, Any], terms: linear.Terms, val_specs: list[Any],
              val_in_memory: dict[str, float], test_specs: list[Any]) -> dict[str, float]:
        """Test accuracy of the real build of ``recipe``, after checking it against its in-memory twin."""
        self.models.load(terms)
        built = self.ev.build(recipe)
        check = self.models.check(built)
        self.ev.load(built)
        val_built = self.ev.score(val_specs)
        check |= {"where": where, "val_in_memory": val_in_memory, "val_built": val_built,
                  "same_val": val_built == val_in_memory}
        self.checks.append(check)
        LOG.info("check %s: max |in memory - built| %.2e (%.1e of max |delta|), validation %s", where,
                 check["max_abs_diff"], check["relative"], "identical" if check["same_val"] else
                 f"differs: {val_in_memory} vs {val_built}")
        return self.ev.score(test_specs)

    def best_lambda(self, terms_of: Callable[[float], linear.Terms]) -> tuple[float, list[dict[str, Any]]]:
        """The λ of the grid with the best validation score, and every (λ, accuracy) tried."""
        val_specs = list(self.ctx.val.values())
        refs = {t: s.reference or 1.0 for t, s in self.ctx.val.items()}
        tried = []
        for lam in self.settings.lambdas:
            acc = self.scored(terms_of(lam), val_specs)
            tried.append({"lambda": lam, "accuracy": acc, "key": list(exp.selection_key(acc, refs))})
        best = max(tried, key=lambda t: tuple(t["key"]))
        return best["lambda"], tried

    # --- Table 2 -----------------------------------------------------------------------------------

    def _dppa_search(self, row: str, entry: dict[str, Any]) -> dict[str, list[float]]:
        """λ with the start factors, the factor search at that λ; the searched factors (into ``entry``)."""
        experts, d = self.ctx.merge_experts, self.settings.merge_density
        s1, s2 = exp.DPA_STARTS[exp.MERGES[row][2]]
        start = {n: [s1, s2 if s2 >= 0.1 else 1.0] for n in experts}
        self.dpa_components(experts, d)
        lam0, grid0 = self.best_lambda(lambda lam: linear.recipe_terms(
            exp.merge_recipe(self.ctx.base, experts, row, lam=lam, density=d, factors=start), self.components))
        recipe = exp.merge_recipe(self.ctx.base, experts, row, lam=lam0, density=d)
        searched = exp.with_search(recipe, self.ctx.val_file(), [f"p_{n}" for n in experts], self.settings)
        (self.ctx.work / f"{row}.search.yaml").write_text(yaml.safe_dump(searched, sort_keys=False))
        result = self.search(searched)
        factors = {n: exp.factor_pair(result, f"p_{n}") for n in experts}
        entry |= {"search_recipe": searched, "search_tasks": str(self.ctx.val_file()), "lambda_for_search": lam0,
                  "val_grid_for_search": grid0, "factors": factors, "val_score": result.best_score,
                  "trials": [{"factors": t.factors, "accuracy": t.task_scores, "score": t.score}
                             for t in result.trials]}
        return factors

    def _row_run(self, row: str, seed: int, factors: dict[str, list[float]] | None) -> dict[str, Any]:
        """One seed of a row: λ on validation (in memory), test on the real build."""
        experts, d = self.ctx.merge_experts, self.settings.merge_density

        def recipe_at(lam: float) -> dict[str, Any]:
            return exp.merge_recipe(self.ctx.base, experts, row, lam=lam, density=d, seed=seed, factors=factors)

        if factors is None:
            delta = self.built_delta(recipe_at(1.0))  # every merge here is base + λ · F

            def terms_of(lam: float) -> linear.Terms:
                return [(lam, delta)]
        else:
            def terms_of(lam: float) -> linear.Terms:
                return linear.recipe_terms(recipe_at(lam), self.components)

        lam, tried = self.best_lambda(terms_of)
        val_acc = next(t["accuracy"] for t in tried if t["lambda"] == lam)
        acc = self.final(f"table2 {row} seed {seed} λ {lam:g}", recipe_at(lam), terms_of(lam),
                         list(self.ctx.val.values()), val_acc, list(self.ctx.test.values()))
        return {"seed": seed, "lambda": lam, "accuracy": acc, "val_grid": tried}

    def table2(self) -> dict[str, Any]:
        """:func:`experiment.table2`'s rows and layout."""
        test_refs = {t: s.reference or 1.0 for t, s in self.ctx.test.items()}
        out: dict[str, Any] = {}
        for row in self.settings.rows:
            _, method, sparsifier = exp.MERGES[row]
            entry: dict[str, Any] = {"runs": []}
            factors = self._dppa_search(row, entry) if sparsifier in exp.DPA_STARTS else None
            seeds = range(self.settings.seeds) if method.startswith("dare") else [0]
            entry["runs"] = [self._row_run(row, seed, factors) for seed in seeds]
            out[row] = _summarise_row(entry, self.ctx, test_refs)
            out[row]["recipe"] = exp.merge_recipe(self.ctx.base, self.ctx.merge_experts, row,
                                                  lam=entry["runs"][0]["lambda"],
                                                  density=self.settings.merge_density, factors=factors)
            LOG.info("table2 %-16s lambda %s: %s average %.3f", row, out[row]["lambdas"],
                     {t: round(a, 3) for t, a in out[row]["accuracy"].items()}, out[row]["average"])
        return out

    # --- Table 1 -----------------------------------------------------------------------------------

    def _dpa_cell(self, label: str, expert: Path, method: str, d: float) -> dict[str, Any]:
        """One searched DP+DPA cell: factors on the expert's validation task (in memory), test on the build."""
        task = self.ctx.task_of[label]
        val_file, val_ref = self.ctx.val_file(task), {task: self.ctx.reference("val", label)}
        self.dpa_components({"e": expert}, d)
        recipe = exp.prune_recipe(self.ctx.base, expert, method, d)
        result = self.search(exp.with_search(recipe, val_file, ["p_e"], self.settings, val_ref))
        acc = self.final(f"table1 {label} {method} d {d:g}", result.resolved,
                         linear.recipe_terms(result.resolved, self.components), [self.ctx.val[task]],
                         dict(result.best.task_scores), [self.ctx.test[task]])
        return {"search_tasks": str(val_file), "factors": exp.factor_pair(result, "p_e"),
                "val_relative": result.best_score, "accuracy_runs": [acc[task]],
                "trials": [{"factors": t.factors["p_e"], "score": t.score} for t in result.trials]}

    def table1(self, experts: dict[str, Path], done: Callable[[dict[str, Any]], None] | None = None
               ) -> dict[str, Any]:
        """:func:`experiment.table1`'s pruning curves for ``experts`` (``done(table)`` after each density)."""
        out: dict[str, Any] = {}
        for label, expert in experts.items():
            task = self.ctx.task_of[label]
            test, ref = self.ctx.test[task], self.ctx.reference("test", label)
            out[label] = {m: {} for m in self.settings.methods}
            for d in self.settings.densities:
                partitions = tuple(float(x["density"]) for x in exp.sparsify_step("e", "dpa_release", d)["partitions"])
                self.components = {k: v for k, v in self.components.items() if k[1] == partitions}  # one density at a time
                for method in self.settings.methods:
                    if method in exp.DPA_STARTS:
                        cell = self._dpa_cell(label, expert, method, d)
                        accs = cell.pop("accuracy_runs")
                    else:
                        cell = {}
                        recipe = exp.prune_recipe(self.ctx.base, expert, method, d)
                        seeds = range(self.settings.seeds) if method == "dare" else [0]
                        accs = [self.ev.accuracy(recipe | {"seed": s}, [test])[task] for s in seeds]
                    acc, std = exp.mean_std(accs)
                    cell |= {"accuracy": acc, "accuracy_std": std, "runs": accs,
                             "relative": acc / ref, "relative_std": std / ref}
                    out[label][method][str(d)] = cell
                    LOG.info("table1 %-10s %-12s d=%.1f: relative %.3f%s", label, method, d, acc / ref,
                             f" ± {std / ref:.3f}" if len(accs) > 1 else
                             (f" factors {cell['factors']}" if "factors" in cell else ""))
                if done is not None:
                    done(out)
        return out


def _summarise_row(entry: dict[str, Any], ctx: exp.Context, test_refs: dict[str, float]) -> dict[str, Any]:
    """Means and standard deviations over a row's runs (seeds), as :func:`experiment.table2` writes them."""
    runs = entry["runs"]
    entry["accuracy"] = {t: exp.mean_std([r["accuracy"][t] for r in runs])[0] for t in ctx.test}
    entry["accuracy_std"] = {t: exp.mean_std([r["accuracy"][t] for r in runs])[1] for t in ctx.test}
    averages = [statistics.fmean(r["accuracy"].values()) for r in runs]
    relatives = [statistics.fmean(r["accuracy"][t] / test_refs[t] for t in ctx.test) for r in runs]
    entry["average"], entry["average_std"] = exp.mean_std(averages)
    entry["relative"], entry["relative_std"] = exp.mean_std(relatives)
    entry["lambdas"] = [r["lambda"] for r in runs]
    return entry


__all__ = ["Sweeper"]
