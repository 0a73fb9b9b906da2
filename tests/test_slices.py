"""The slices step: layer ranges stacked and renumbered, streamed, config updated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergeengine.api import plan_recipe, run_recipe
from mergeengine.errors import RecipeError, ShapeError
from tests.conftest import load_tensors, read_folder, write_recipe


def _stack(tmp_path: Path, base: Path, math: Path, slices: str) -> Path:
    return write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {base}}}
          - {{id: math, op: load, model: {math}}}
          - {{id: stack, op: slices, slices: {slices}}}
          - {{id: out, op: save, input: stack, path: {tmp_path / 'out'}}}
        """)


def test_layers_renumbered_repeated_and_streamed(models: dict[str, Path], tmp_path: Path) -> None:
    base, math = tmp_path / "base", tmp_path / "math"
    shutil.copytree(models["base32"], base)
    shutil.copytree(models["math32"], math)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "layer_types": ["full", "sliding"]}))
    recipe = _stack(tmp_path, base, math, "[{model: base, layer_range: [0, 2]}, {model: math, layer_range: [1, 2]}, "
                                          "{model: base, layer_range: [0, 1]}]")
    plan = plan_recipe(recipe)
    result = run_recipe(recipe)
    got, b, m = read_folder(tmp_path / "out"), load_tensors(base), load_tensors(math)
    source = {0: (b, 0), 1: (b, 1), 2: (m, 1), 3: (b, 0)}
    for out_layer, (tensors, layer) in source.items():
        for name, t in tensors.items():
            if f".layers.{layer}." in name:
                assert torch.equal(got[name.replace(f".layers.{layer}.", f".layers.{out_layer}.")], t)
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # the last slice's
    assert len(got) == 4 * 9 + 3
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["num_hidden_layers"] == 4 and out_cfg["layer_types"] == ["full", "sliding", "sliding", "full"]
    # layer 0 of base is written twice: read twice (never held from one position to the other)
    assert plan.estimate.bytes_read == plan.estimate.bytes_written == result.stats.bytes_read
    largest = max(t.numel() * 4 for t in got.values())
    assert result.stats.peak_live_bytes == plan.estimate.peak_live_bytes <= 3 * largest


def test_slice_errors_name_the_step(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = _stack(tmp_path, models["base32"], models["math32"], "[{model: base, layer_range: [1, 3]}]")
    with pytest.raises(ShapeError, match=r"step 'stack'.*slice \[1, 3\] of 'base': it has 2 layers"):
        plan_recipe(recipe)
    recipe = _stack(tmp_path, models["base32"], models["math32"], "[{model: base, layer_range: [2, 1]}]")
    with pytest.raises(RecipeError, match=r"recipe.yaml:4:\d+: step 'stack'.*layer_range \[2, 1\] must satisfy"):
        plan_recipe(recipe)
