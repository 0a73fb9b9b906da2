"""The second miniature's in-memory sweeps (benchmarks/minipaper/linear.py) against real mergeengine builds.

A Table 2 merge at any λ, and a DPPA merge at any λ and DPA factors, written as a linear
combination of deltas mergeengine built once, must be the tensors mergeengine builds for that
recipe (up to float32 rounding).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mergeengine import api

MINIPAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "minipaper"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(MINIPAPER))
    try:
        return {name: importlib.import_module(name) for name in ("experiment", "linear")}
    finally:
        sys.path.remove(str(MINIPAPER))


def _holder(base: Path) -> SimpleNamespace:
    """A stand-in for the evaluation model: its state dict is a set of float32 tensors shaped like the base."""
    from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(base)
    params = {n: torch.zeros(info.shape) for n, info in ckpt.tensors().items()}
    return SimpleNamespace(state_dict=lambda: params)


def _components(mods, models, experts: dict[str, Path], lm, density: float) -> dict:
    exp, linear = mods["experiment"], mods["linear"]
    out = {}
    for name, folder in experts.items():
        step = exp.sparsify_step(name, "dpa_release", density)
        steps = {"base": {"id": "base", "op": "load", "model": str(models["base32"])},
                 name: {"id": name, "op": "load", "model": str(folder)},
                 f"d_{name}": {"id": f"d_{name}", "op": "diff", "model": name, "base": "base"}}
        parts = [lm.component(api.build_in_memory(
            {"steps": [*steps.values(), part, {"id": "out", "op": "save", "input": part["id"], "path": "./o"}]}, "out"))
            for part in linear.component_steps(step)]
        out[linear.dpa_key(steps, step)] = tuple(parts)
    return out


def test_dppa_merge_is_linear_in_lambda_and_factors(mods, models) -> None:
    exp, linear = mods["experiment"], mods["linear"]
    experts = {"math": models["math32"], "code": models["code32"]}
    lm = linear.LinearModels(_holder(models["base32"]), models["base32"])
    comps = _components(mods, models, experts, lm, 0.2)
    a, b = comps[(str(models["math32"]), (0.1, 0.2))]
    assert a.sparse and a.dense and b.sparse and not b.dense  # B: only the kept linear weights
    for lam, factors in ((0.7, {"math": [1.3, 1.1], "code": [0.9, 1.4]}), (1.4, {"math": [1.8, 1.0], "code": [1.0, 1.0]})):
        recipe = exp.merge_recipe(models["base32"], experts, "dppa_release", lam=lam, density=0.2, factors=factors)
        lm.load(linear.recipe_terms(recipe, comps))
        check = lm.check(api.build_in_memory(recipe, "out"))
        assert check["max_abs_delta"] > 1e-3 and check["max_abs_diff"] < 1e-6, check
    wrong = exp.merge_recipe(models["base32"], experts, "dppa_release", lam=1.0, density=0.3, factors=factors)
    with pytest.raises(ValueError, match="no components built"):
        linear.recipe_terms(wrong, comps)
    wrong["steps"][3]["factors"] = "own"
    with pytest.raises(ValueError, match="factors: release"):
        linear.recipe_terms(wrong, comps)


@pytest.mark.parametrize("row", ["ties", "dare_ties"])
def test_merges_scale_their_delta_by_lambda(mods, models, row: str) -> None:
    exp, linear = mods["experiment"], mods["linear"]
    experts = {"math": models["math32"], "code": models["code32"]}
    lm = linear.LinearModels(_holder(models["base32"]), models["base32"])
    delta = lm.component(api.build_in_memory(exp.merge_recipe(models["base32"], experts, row, seed=3), "out"))
    for lam in (0.5, 1.3):
        lm.load([(lam, delta)])
        check = lm.check(api.build_in_memory(exp.merge_recipe(models["base32"], experts, row, lam=lam, seed=3), "out"))
        assert check["max_abs_delta"] > 1e-3 and check["max_abs_diff"] < 1e-6, check
    lm.load([(1.0, delta)])  # another DARE seed is another delta
    other = lm.check(api.build_in_memory(exp.merge_recipe(models["base32"], experts, row, seed=4), "out"))
    assert (other["max_abs_diff"] > 1e-4) == (row == "dare_ties")
