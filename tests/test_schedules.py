"""Parameter schedules: gradients over layer depth and filters, resolved per tensor (mergekit's rules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeengine.api import plan_recipe, run_recipe
from mergeengine.cli import main
from mergeengine.errors import RecipeError
from mergeengine.recipe.schedule import Filtered, Gradient, layer_depth, resolve
from tests.conftest import load_tensors, read_folder, write_recipe


def test_gradient_follows_mergekit_interpolation() -> None:
    g = Gradient((0.0, 0.5, 0.3, 0.7, 1.0))
    # mergekit: scaled = t * (n - 1); linear between anchors floor(scaled) and the next
    assert g.at(0.0) == 0.0 and g.at(1.0) == 1.0
    assert g.at(0.25) == 0.5
    assert g.at(0.375) == pytest.approx(0.4)
    assert layer_depth("model.layers.3.mlp.up_proj.weight", 7) == 0.5
    assert layer_depth("model.embed_tokens.weight", 7) == 0.0
    assert layer_depth("lm_head.weight", 7) == 0.0
    assert layer_depth("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_filters_first_match_substring_or_glob() -> None:
    f = Filtered((("self_attn", 0.1), ("*.mlp.*_proj.weight", Gradient((0.0, 1.0))), (None, 0.9)))
    assert resolve(f, "model.layers.1.self_attn.q_proj.weight", 1.0) == 0.1
    assert resolve(f, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5
    assert resolve(f, "model.norm.weight", 0.0) == 0.9
    assert resolve(Filtered((("mlp", 0.2),)), "model.norm.weight", 0.0) is None


def _steps(models: dict[str, Path], merge: str, out: Path) -> str:
    return f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: math, op: load, model: {models['math32']}}}
          - {{id: code, op: load, model: {models['code32']}}}
          {merge}
          - {{id: out, op: save, input: m, path: {out}, dtype: float32}}
        """


def test_lambda_gradient_and_filters_end_to_end(models: dict[str, Path], tmp_path: Path) -> None:
    """task_arithmetic with a filtered, graded lambda against the formula per tensor."""
    merge = ("- {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math, code], weights: [1, 0.5], "
             "lambda: [{filter: self_attn, value: [0.2, 1.0, 0.4]}, {filter: '*.mlp.*_proj.weight', value: 0.3}, "
             "{value: 0.7}]}")
    run_recipe(write_recipe(tmp_path, _steps(models, merge, tmp_path / "out")))
    got = read_folder(tmp_path / "out")
    b, m, c = (load_tensors(models[k]) for k in ("base32", "math32", "code32"))
    for name, w in b.items():
        layer = 1 if ".layers.1." in name else 0
        if "self_attn" in name:
            lam = (0.2, 0.4)[layer]  # two layers: t = 0 and 1, the first and last anchors
        elif ".mlp." in name:
            lam = 0.3
        else:
            lam = 0.7
        want = w.double() + lam * ((m[name].double() - w) + 0.5 * (c[name].double() - w))
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)


def test_per_input_density_gradient_equals_constant_runs(models: dict[str, Path], tmp_path: Path) -> None:
    """TIES with input 0's density graded 0.2 -> 0.8: each layer equals a run with that layer's constants."""
    def run(density: str, name: str) -> dict[str, torch.Tensor]:
        merge = f"- {{id: m, op: merge, method: ties, base: base, inputs: [math, code], density: {density}}}"
        run_recipe(write_recipe(tmp_path, _steps(models, merge, tmp_path / name), name + ".yaml"))
        return read_folder(tmp_path / name)

    graded, first, last = run("[[0.2, 0.8], 0.5]", "graded"), run("[0.2, 0.5]", "first"), run("[0.8, 0.5]", "last")
    for name, t in graded.items():
        want = last[name] if ".layers.1." in name else first[name]
        assert torch.equal(t, want), name
    assert not torch.equal(first["model.layers.1.mlp.up_proj.weight"], last["model.layers.1.mlp.up_proj.weight"])


def test_schedule_validation_before_any_weight(models: dict[str, Path], tmp_path: Path) -> None:
    bad_anchor = "- {id: m, op: merge, method: ties, base: base, inputs: [math], density: [[0.2, 1.5]]}"
    with pytest.raises(RecipeError) as exc:
        plan_recipe(write_recipe(tmp_path, _steps(models, bad_anchor, tmp_path / "o")))
    assert any("recipe.yaml:5:" in p and "field 'density': Input should be less than or equal to 1" in p
               for p in exc.value.problems), exc.value.problems

    no_default = ("- {id: m, op: merge, method: ties, base: base, inputs: [math], "
                  "density: [{filter: mlp, value: 0.5}]}")
    with pytest.raises(RecipeError, match="no filter of 'density' matches tensor 'lm_head.weight'"):
        plan_recipe(write_recipe(tmp_path, _steps(models, no_default, tmp_path / "o")))



def test_unmatched_filter_takes_the_field_default(models: dict[str, Path], tmp_path: Path) -> None:
    merge = ("- {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math], "
             "lambda: [{filter: lm_head, value: 0.0}]}")
    run_recipe(write_recipe(tmp_path, _steps(models, merge, tmp_path / "out")))
    got, b, m = read_folder(tmp_path / "out"), load_tensors(models["base32"]), load_tensors(models["math32"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(got["model.norm.weight"], m["model.norm.weight"])  # lambda's default 1: the fine-tune


def test_plan_shows_schedule_and_explains_a_tensor(models: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    merge = ("- {id: m, op: merge, method: ties, base: base, inputs: [math, code], density: [[0.2, 0.8], 0.5], "
             "lambda: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]}")
    recipe = write_recipe(tmp_path, _steps(models, merge, tmp_path / "out"))
    assert main(["plan", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "schedule: density layers.1: [0.8, 0.5]" in text
    assert "schedule: lambda layers.1: 0.5 (input_layernorm, mlp.down_proj and 3 more), 1 (self_attn" in text
    assert main(["plan", str(recipe), "--explain", "model.layers.1.self_attn.q_proj.weight"]) == 0
    text = capsys.readouterr().out
    assert "lambda=1.0 (scheduled)" in text and "density=[0.8, 0.5] (scheduled)" in text
    assert main(["plan", str(recipe), "--explain", "model.norm.weight"]) == 0
    assert "lambda=0.5 (scheduled)" in capsys.readouterr().out


def test_delta_ops_take_schedules(models: dict[str, Path], tmp_path: Path) -> None:
    """magnitude_prune with a density gradient: layer 0 keeps 25%, layer 1 75% (two layers: first, last anchor)."""
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: math, op: load, model: {models['math32']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: p, op: magnitude_prune, input: d, density: [0.25, 0.75]}}
          - {{id: out, op: save, input: p, path: {tmp_path / 'out'}, dtype: float32}}
        """)
    run_recipe(recipe)
    got, b = read_folder(tmp_path / "out"), load_tensors(models["base32"])
    for layer, density in ((0, 0.25), (1, 0.75)):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        kept = int(((got[name] - b[name]) != 0).sum())
        assert kept == round(density * b[name].numel()), (name, kept)
