"""mergekit configs: schema, key-by-key rejection, convert CLI, and the switches for mergekit's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeengine.api import run_recipe
from mergeengine.cli import main
from mergeengine.errors import RecipeError
from mergeengine.kernels.select_exact import keep_count
from mergeengine.kernels.sparsify import breadcrumbs
from mergeengine.kernels.ties import ties_merge, ties_merge_into
from mergeengine.recipe.loader import load_recipe
from tests.conftest import load_tensors, read_folder


def _config(tmp_path: Path, models: dict[str, Path], body: str, name: str = "mk.yml") -> Path:
    p = tmp_path / name
    p.write_text(body.replace("BASE", str(models["base32"])).replace("MATH", str(models["math32"]))
                 .replace("CODE", str(models["code32"])))
    return p


TIES = """\
models:
  - model: BASE
  - model: MATH
    parameters: {weight: 1.0, density: 0.5}
  - model: CODE
    parameters: {weight: 0.5, density: 0.3}
merge_method: ties
base_model: BASE
dtype: float32
"""


def test_zero_vote_positive_and_unnormalized_sum() -> None:
    a, b = torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-1.0, 2.0, 0.0, 1.0])
    # votes 0, 0, 0, 4: mergekit elects + at the first two, so the positive delta survives there
    assert ties_merge([a, b], [1.0, 1.0]).tolist() == [0.0, 0.0, 0.0, 2.0]
    assert ties_merge([a, b], [1.0, 1.0], zero_vote="positive").tolist() == [1.0, 2.0, 0.0, 2.0]
    assert ties_merge([a, b], [1.0, 1.0], normalize=False).tolist() == [0.0, 0.0, 0.0, 4.0]
    for normalize in (True, False):
        for zero_vote in ("zero", "positive"):
            want = ties_merge([a, b], [1.0, 0.5], "weighted", normalize, zero_vote)
            out, scratch = torch.empty(4), [torch.empty(4), torch.empty(4)]
            got = ties_merge_into([a.clone(), b.clone()], [1.0, 0.5], out, scratch, "weighted", normalize, zero_vote)
            assert torch.equal(got, want), (normalize, zero_vote)


def test_keep_count_truncate_is_mergekits_int() -> None:
    assert keep_count(100, 0.29) == 29 and keep_count(100, 0.29, "truncate") == 28  # 0.29 * 100 = 28.999...
    norm = torch.arange(1.0, 65.0)  # a 64-entry norm: gamma 0.01 drops round(0.64) = 1 here, int(0.64) = 0 in mergekit
    assert breadcrumbs(norm, 0.5, 0.01)[-1] == 0
    kept = breadcrumbs(norm, 0.5, 0.01, "truncate")
    assert kept[-1] == 64 and int((kept != 0).sum()) == 32


def test_run_and_convert_a_mergekit_file(models: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, models, TIES)
    assert load_recipe(cfg).recipe.steps[3].keep_count == "truncate"  # type: ignore[union-attr]
    assert main(["convert", str(cfg), "-o", str(tmp_path / "recipe.yaml")]) == 0
    text = (tmp_path / "recipe.yaml").read_text()
    assert "vote: weighted, zero_vote: positive, keep_count: truncate" in text
    assert "# keep_count: truncate: mergekit's top-k count" in text
    assert main(["run", str(cfg), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "b"), "-q"]) == 0
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert main(["plan", str(cfg), "--out", str(tmp_path / "c")]) == 0
    assert "merge:ties" in capsys.readouterr().out


@pytest.mark.parametrize(("edit", "message"), [
    (("dtype: float32", "dtype: float32\nmystery: 1"), "3:1: mergekit key 'mystery' is not part of mergekit's config"),
    (("merge_method: ties", "merge_method: passthrough"), "mergekit key 'slices.0.sources': passthrough takes one"),
    (("dtype: float32", "dtype: float32\ntokenizer_source: MATH"), "mergekit key 'tokenizer_source': a tokenizer taken"),
    (("dtype: float32", "dtype: float32\nchat_template: chatmlx"), "mergekit key 'chat_template': 'chatmlx' is not"),
    (("dtype: float32", "dtype: int8"), "mergekit key 'dtype': dtype 'int8' is not supported"),
    (("merge_method: ties", "merge_method: frobnicate"), "merge_method 'frobnicate' has no mergeengine translation"),
    (("density: 0.3}", "density: 0.3, epsilon: 0.1}"), "mergekit key 'models.2.parameters.epsilon': not a per-model"),
    (("dtype: float32", "dtype: float32\nparameters: {normalize: [true]}"), "'normalize' must be true or false"),
    (("density: 0.3}", "density: 1.5}"), "step 'merge': field 'density': Input should be less than or equal to 1"),
    (("    parameters: {weight: 0.5, density: 0.3}", "    parameters: {density: 0.3}"), "model 2 needs parameter 'weight'"),
])
def test_every_unsupported_key_is_one_line_naming_it(models: dict[str, Path], tmp_path: Path,
                                                     edit: tuple[str, str], message: str) -> None:
    body = TIES.replace(*edit)
    if "mystery" in edit[1]:
        body = "mystery: 1\n" + TIES
        message = "1:1: mergekit key 'mystery' is not part of mergekit's config"
    if "passthrough" in edit[1]:
        body = ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: BASE, layer_range: [0, 1]}\n"
                "      - {model: MATH, layer_range: [0, 1]}\n")
    cfg = _config(tmp_path, models, body)
    with pytest.raises(RecipeError) as exc:
        load_recipe(cfg)
    assert any(message in p for p in exc.value.problems), exc.value.problems
    assert all(p.startswith(f"{cfg}:") for p in exc.value.problems)
    out = tmp_path / "recipe.yaml"
    assert main(["convert", str(cfg), "-o", str(out)]) == 1
    assert not out.exists()  # nothing half-written


def test_dare_ties_defaults_follow_mergekit(models: dict[str, Path], tmp_path: Path) -> None:
    body = TIES.replace("merge_method: ties", "merge_method: dare_ties")
    step = load_recipe(_config(tmp_path, models, body)).recipe.steps[3]
    assert (step.rescale, step.normalize, step.vote, step.zero_vote) == ("l1", False, "weighted", "positive")  # type: ignore[union-attr]
    body = TIES.replace("merge_method: ties", "merge_method: dare_linear").replace(
        "dtype: float32", "dtype: float32\nparameters: {normalize: true, rescale: false}")
    step = load_recipe(_config(tmp_path, models, body, "b.yml")).recipe.steps[3]
    assert (step.rescale, step.normalize, step.weights) == ("none", True, [1.0, 0.5])  # type: ignore[union-attr]


def test_model_with_revision_and_long_form_references(models: dict[str, Path], tmp_path: Path) -> None:
    body = f"""\
models:
  - model: {{model: {{path: "{models['math32']}"}}}}
    parameters: {{weight: 1.0}}
merge_method: task_arithmetic
base_model: "{models['base32']}"
"""
    cfg = tmp_path / "long.yml"
    cfg.write_text(body)
    run_recipe(cfg, out=tmp_path / "o")
    got, want = read_folder(tmp_path / "o"), load_tensors(models["math32"])
    assert all(torch.equal(got[n], want[n]) for n in want)
    cfg.write_text(body.replace("{model: {path:", "{override_architecture: X, model: {path:"))
    with pytest.raises(RecipeError, match="override_architecture is not supported"):
        load_recipe(cfg)
