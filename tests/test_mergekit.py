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
    (("dtype: float32", "dtype: float32\ntokenizer: {tokens: {x: {source: /elsewhere}}}"),
     "mergekit key 'tokenizer.tokens.x.source': the source must be a model of the merge"),
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


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "hardlink"])
def test_convert_refuses_to_write_over_its_own_config(models: dict[str, Path], tmp_path: Path, spelling: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, models, TIES)
    (tmp_path / "x").mkdir()
    out = {"same": cfg, "symlink": tmp_path / "link.yml", "dotdot": tmp_path / "x" / ".." / "mk.yml",
           "hardlink": tmp_path / "x" / "hard.yml"}[spelling]
    if spelling == "symlink":
        out.symlink_to(cfg)
    if spelling == "hardlink":
        out.hardlink_to(cfg)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["convert", str(cfg), "-o", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {out}: is the mergekit config being converted ({cfg}); "
                    "write the recipe to another file")
    assert cfg.read_text() == TIES.replace("BASE", str(models["base32"])).replace(
        "MATH", str(models["math32"])).replace("CODE", str(models["code32"]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary left


def test_dare_ties_defaults_follow_mergekit(models: dict[str, Path], tmp_path: Path) -> None:
    body = TIES.replace("merge_method: ties", "merge_method: dare_ties")
    step = load_recipe(_config(tmp_path, models, body)).recipe.steps[3]
    assert (step.rescale, step.normalize, step.vote, step.zero_vote) == ("l1", False, "weighted", "positive")  # type: ignore[union-attr]
    body = TIES.replace("merge_method: ties", "merge_method: dare_linear").replace(
        "dtype: float32", "dtype: float32\nparameters: {normalize: true, rescale: false}")
    step = load_recipe(_config(tmp_path, models, body, "b.yml")).recipe.steps[3]
    assert (step.rescale, step.normalize, step.weights) == ("none", True, [1.0, 0.5])  # type: ignore[union-attr]


def test_della_defaults_follow_mergekit(models: dict[str, Path], tmp_path: Path) -> None:
    body = TIES.replace("merge_method: ties", "merge_method: della").replace("density: 0.3}", "density: 0.3, epsilon: 0.1}")
    step = load_recipe(_config(tmp_path, models, body)).recipe.steps[3]
    assert (step.method, step.rescale, step.normalize, step.vote, step.zero_vote) == (  # type: ignore[union-attr]
        "della", "l1", True, "weighted", "positive")
    assert (step.density, step.epsilon, step.weights) == ([0.5, 0.3], [0.15, 0.1], [1.0, 0.5])  # type: ignore[union-attr]
    body = TIES.replace("merge_method: ties", "merge_method: della_linear")
    step = load_recipe(_config(tmp_path, models, body, "b.yml")).recipe.steps[3]
    assert (step.rescale, step.normalize) == ("l1", False)  # type: ignore[union-attr]
    text = (tmp_path / "della.yaml")
    assert main(["convert", str(tmp_path / "mk.yml"), "-o", str(text)]) == 0
    assert "MAGPRUNE draws from mergeengine's seeded generators" in text.read_text()


@pytest.mark.parametrize(("method", "models_body", "field", "value", "comment"), [
    ("model_stock", "  - model: MATH\n  - model: CODE\n", "negative_cos", "extrapolate",
     "negative_cos: extrapolate: mergekit's ratio where the mean cosine is negative"),
    ("arcee_fusion", "  - model: MATH\n", "kl_dtype", "float32", "kl_dtype: float32: mergekit's KL divergence precision"),
    ("sce", "  - model: MATH\n  - model: CODE\n", "zero_vote", "positive",
     "zero_vote: positive: mergekit's sign election on the plain sum"),
])
def test_convert_sets_mergekit_switches_with_a_comment(models: dict[str, Path], tmp_path: Path, method: str,
                                                       models_body: str, field: str, value: str,
                                                       comment: str) -> None:
    """model_stock, arcee_fusion and sce get mergekit's behaviour where mergeengine's default differs."""
    body = f"models:\n  - model: BASE\n{models_body}merge_method: {method}\nbase_model: BASE\ndtype: float32\n"
    cfg = _config(tmp_path, models, body)
    step = load_recipe(cfg).recipe.steps[-2]
    assert getattr(step, field) == value
    out = tmp_path / "recipe.yaml"
    assert main(["convert", str(cfg), "-o", str(out)]) == 0
    text = out.read_text()
    assert comment in text and f"{field}: {value}" in text
    assert load_recipe(out).recipe.steps[-2].model_dump() == step.model_dump()


@pytest.mark.parametrize(("method", "extra", "message"), [
    ("karcher", "", None),
    ("nuslerp", "", None),
    ("arcee_fusion", "", "'models': arcee_fusion merges exactly 1 model(s) besides the base, got 2"),
    ("sce", "parameters: {select_topk: 0.5, weight: 1}", "'parameters.weight': not a parameter of sce"),
])
def test_other_methods_translate_their_base(models: dict[str, Path], tmp_path: Path, method: str, extra: str,
                                            message: str | None) -> None:
    """karcher merges base_model as one more model; nuslerp takes it as the origin; errors name the key."""
    body = TIES.replace("merge_method: ties", f"merge_method: {method}\n{extra}").replace(", density: 0.5", "").replace(
        ", density: 0.3", "")
    if method in ("karcher", "sce", "arcee_fusion"):
        body = body.replace("    parameters: {weight: 1.0}\n", "").replace("    parameters: {weight: 0.5}\n", "")
    cfg = _config(tmp_path, models, body)
    if message is not None:
        with pytest.raises(RecipeError) as exc:
            load_recipe(cfg)
        assert any(message in p for p in exc.value.problems), exc.value.problems
        return
    step = load_recipe(cfg).recipe.steps[3]
    if method == "karcher":
        assert (step.inputs, step.base) == (["base32", "math32", "code32"], None)  # type: ignore[union-attr]
    else:
        assert (step.inputs, step.base, step.weights) == (["math32", "code32"], "base32", [1.0, 0.5])  # type: ignore[union-attr]


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


def test_default_module_is_the_top_level_form(models: dict[str, Path], tmp_path: Path) -> None:
    """modules: {default: ...} (mergekit's one module of a text-only model) gives the bytes of the top-level form;
    its parameters sit over the global ones; another module name is one line naming it."""
    lines = TIES.splitlines(keepends=True)
    body = "modules:\n  default:\n    parameters: {normalize: false}\n    models:\n" + "".join(
        "    " + line for line in lines[1:6]) + "".join(lines[6:])
    run_recipe(_config(tmp_path, models, body, "mod.yml"), out=tmp_path / "a")
    flat = TIES.replace("dtype: float32", "dtype: float32\nparameters: {normalize: false}")
    run_recipe(_config(tmp_path, models, flat, "flat.yml"), out=tmp_path / "b")
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(RecipeError, match=r"mod2.yml:2:3: mergekit key 'modules.vision': only mergekit's single"):
        load_recipe(_config(tmp_path, models, body.replace("default:", "vision:"), "mod2.yml"))


def test_residual_weight_has_no_effect_and_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    body = ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: BASE, layer_range: [0, 1]}\n"
            "    residual_weight: 0.5\n  - sources:\n      - {model: MATH, layer_range: [1, 2]}\ndtype: float32\n")
    cfg = _config(tmp_path, models, body)
    text = tmp_path / "r.yaml"
    assert main(["convert", str(cfg), "-o", str(text)]) == 0
    assert "# residual_weight of slice(s) 0: declared in mergekit's schema but read nowhere" in text.read_text()
    run_recipe(cfg, out=tmp_path / "a")
    run_recipe(_config(tmp_path, models, body.replace("    residual_weight: 0.5\n", ""), "b.yml"), out=tmp_path / "b")
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
