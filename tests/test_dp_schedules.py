"""Schedules on the steps with whole-model statistics (dp_prune, dpa_amplify, TIES with a model-wide trim),
end to end on a 4-layer tiny model, against whole-tensor computations written from docs/recipes.md."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergeengine import api
from mergeengine.cli import main
from mergeengine.errors import RecipeError
from mergeengine.recipe.loader import load_recipe
from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint
from tests.conftest import load_tensors, read_folder, write_recipe

LAYERS = 4
SHAPE = LlamaShape(num_hidden_layers=LAYERS)
PerTensor = Callable[[str], float]


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, math and code with four decoder layers (float32), so a gradient has inner layers."""
    root = tmp_path_factory.mktemp("deep")
    base = make_weights(SHAPE, seed=0)
    return {"base": write_checkpoint(root / "base", base, SHAPE),
            "math": write_checkpoint(root / "math", fine_tune(base, seed=1, scale=0.004), SHAPE),
            "code": write_checkpoint(root / "code", fine_tune(base, seed=2, scale=0.004), SHAPE)}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def depth(name: str) -> float:
    """mergekit's t: layer / (layers - 1), 0 outside the layers."""
    layer = _layer(name)
    return 0.0 if layer is None else layer / (LAYERS - 1)


def gradient(a: float, b: float) -> PerTensor:
    """A two-anchor gradient, as docs/recipes.md states it (linear between the anchors over depth)."""
    return lambda n: (1 - depth(n)) * a + depth(n) * b


def reference_dp_masks(deltas: dict[str, torch.Tensor], d: PerTensor, lamda: PerTensor, module_m: PerTensor,
                       layer_l: PerTensor) -> dict[str, torch.Tensor]:
    """docs/recipes.md's DP steps 1-6 with every parameter per tensor: the keep mask of each linear weight."""
    names = [n for n, t in deltas.items() if t.dim() == 2 and _layer(n) is not None]
    layers = sorted({_layer(n) for n in names})
    o = {}
    for layer in layers:  # 1: layer outlier ratio, each tensor's entries against its own L x the layer mean
        own = [n for n in names if _layer(n) == layer]
        mean = torch.cat([deltas[n].abs().flatten().double() for n in own]).mean()
        count = sum(int((deltas[n].abs().double() > layer_l(n) * mean).sum()) for n in own)
        o[layer] = 100.0 * count / sum(deltas[n].numel() for n in own)
    c = {layer: o[layer] - sum(o.values()) / len(o) for layer in layers}  # 2: centred, over max |c|
    c_max = max(abs(v) for v in c.values())
    layer_off = {layer: (v / c_max if c_max > 1e-12 else 0.0) for layer, v in c.items()}
    r = {n: 100.0 * float((deltas[n].abs().double() > module_m(n) * deltas[n].abs().double().mean()).sum())
         / deltas[n].numel() for n in names}  # 3
    mean_r = sum(r.values()) / len(r)  # 4
    r = {n: v / mean_r for n, v in r.items()}
    numel = {n: deltas[n].numel() for n in names}
    weighted = sum(numel[n] * r[n] for n in names) / sum(numel.values())
    r = {n: r[n] - weighted for n in names}
    r_max = max(abs(v) for v in r.values())
    masks = {}
    for n in names:  # 5: the module's own d and lamda around the offsets; 6: prune
        density = min(1.0, max(0.0, d(n) + lamda(n) * layer_off[_layer(n)] + lamda(n) * r[n] / r_max))
        k = math.floor(deltas[n].numel() * (1 - density) + 1e-6)
        a = deltas[n].abs().flatten()
        kth = a.sort().values[k - 1] if k > 0 else -1.0
        masks[n] = deltas[n].abs() > kth
    return masks


def _run(tmp_path: Path, deep: dict[str, Path], steps: str, name: str = "out") -> dict[str, torch.Tensor]:
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          {steps}
          - {{id: out, op: save, input: x, path: {tmp_path / name}, dtype: float32}}
        """, name + ".yaml")
    api.run_recipe(recipe, overwrite=True)
    return read_folder(tmp_path / name)


def _deltas(deep: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    b, f = load_tensors(deep["base"]), load_tensors(deep["math"])
    return b, {n: f[n] - b[n] for n in b}


def test_dp_prune_density_gradient_and_filters(tmp_path: Path, deep: dict[str, Path]) -> None:
    """d graded over depth for attention, constant elsewhere, a filtered module threshold: the DP offsets
    apply around each module's own d."""
    got = _run(tmp_path, deep, "- {id: x, op: dp_prune, input: d, density: [{filter: self_attn, value: [0.2, 0.6]}, "
                               "{value: 0.4}], module_threshold: [{filter: mlp, value: 4}, {value: 5}]}")
    b, deltas = _deltas(deep)
    masks = reference_dp_masks(deltas, lambda n: gradient(0.2, 0.6)(n) if "self_attn" in n else 0.4,
                               lambda n: 0.08, lambda n: 4.0 if ".mlp." in n else 5.0, lambda n: 3.0)
    assert len(masks) == 7 * LAYERS
    for n, w in b.items():
        kept = got[n] - w
        if n not in masks:
            torch.testing.assert_close(kept, deltas[n], rtol=0, atol=1e-7, msg=n)
            continue
        assert torch.equal(kept != 0, masks[n]), n
        torch.testing.assert_close(kept[masks[n]], deltas[n][masks[n]], rtol=0, atol=1e-7, msg=n)
    fractions = {layer: float(masks[f"model.layers.{layer}.self_attn.q_proj.weight"].float().mean())
                 for layer in range(LAYERS)}
    assert fractions[0] < fractions[1] < fractions[2] < fractions[3], fractions  # the gradient shows
    report = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]
    assert report["target_density"] is None and report["lamda"] == 0.08
    module = report["layers"]["model.layers.1"]["modules"]["self_attn.q_proj"]
    assert module["target_density"] == pytest.approx(0.2 + 0.4 / 3)
    assert report["layers"]["model.layers.1"]["density"] is None  # attention and MLP differ in that layer


def test_dpa_amplify_scheduled_partitions_fused_and_stored(tmp_path: Path, deep: dict[str, Path]) -> None:
    """Partition densities (a gradient, a filter list), a scheduled scale and dense_scale; the merge that
    amplifies chunk by chunk (fused) and a stored amplified delta give the reference."""
    dpa = ("{id: ID, op: dpa_amplify, input: d, lamda: [0.04, 0.1], "
           "partitions: [{density: [0.1, 0.25], scale: 2.0}, "
           "{density: [{filter: mlp, value: 0.4}, {value: 0.3}], scale: [{filter: o_proj, value: 0.0}, {value: 0.5}]}], "
           "dense_scale: [{filter: norm, value: 1.0}, {value: 0.25}]}")
    merge = "{id: x, op: merge, method: task_arithmetic, base: base, inputs: [a]}"
    fused = _run(tmp_path, deep, f"- {dpa.replace('ID', 'a')}\n          - {merge}", "fused")
    assert api.plan_recipe(tmp_path / "fused.yaml").step_plans["x"].fused == ("a",)  # chunk by chunk
    stored = _run(tmp_path, deep, f"- {dpa.replace('ID', 'x')}", "stored")
    b, deltas = _deltas(deep)
    lam = gradient(0.04, 0.1)
    inner = reference_dp_masks(deltas, gradient(0.1, 0.25), lam, lambda n: 5.0, lambda n: 3.0)
    outer = reference_dp_masks(deltas, lambda n: 0.4 if ".mlp." in n else 0.3, lam, lambda n: 5.0, lambda n: 3.0)
    for n, w in b.items():
        if n not in inner:
            want = deltas[n] * (1.0 if "norm" in n else 0.25)
        else:
            assert bool((inner[n] <= outer[n]).all()), n  # nested
            second = 0.0 if "o_proj" in n else 0.5
            want = torch.where(inner[n], 2.0 * deltas[n], torch.where(outer[n], second * deltas[n], 0.0))
        torch.testing.assert_close(fused[n] - w, want, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(stored[n] - w, want, rtol=0, atol=1e-6, msg=n)


def test_ties_model_scope_shares_a_threshold_per_scheduled_value(tmp_path: Path, deep: dict[str, Path]) -> None:
    """trim_scope: model with input 0's density graded over depth: the tensors sharing a value (a layer, and the
    tensors outside the layers with layer 0, at t = 0) keep that fraction of their entries by one threshold."""
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: code, op: load, model: {deep['code']}}}
          - {{id: x, op: merge, method: ties, base: base, inputs: [math, code], trim_scope: model,
              density: [[0.2, 0.6], 0.4]}}
          - {{id: out, op: save, input: x, path: {tmp_path / 'out'}, dtype: float32}}
        """)
    api.run_recipe(recipe)
    got = read_folder(tmp_path / "out")
    b = load_tensors(deep["base"])
    deltas = [{n: t - b[n] for n, t in load_tensors(deep[m]).items()} for m in ("math", "code")]
    schedules = [gradient(0.2, 0.6), lambda n: 0.4]
    trimmed: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, d_of in enumerate(schedules):
        groups: dict[float, list[str]] = {}
        for n in b:
            groups.setdefault(d_of(n), []).append(n)
        assert len(groups) == (LAYERS if i == 0 else 1)
        for density, names in groups.items():
            magnitudes = torch.cat([deltas[i][n].abs().flatten() for n in names])
            keep = math.floor(density * magnitudes.numel() + 0.5)
            threshold = magnitudes.sort(descending=True).values[keep - 1]
            for n in names:
                trimmed[i][n] = torch.where(deltas[i][n].abs() >= threshold, deltas[i][n], 0.0)
    for n, w in b.items():
        t = torch.stack([trimmed[0][n], trimmed[1][n]]).double()
        sign = torch.sign(t.sum(0))
        agree = (t != 0) & (torch.sign(t) == sign)
        merged = (t * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[n].double(), w.double() + merged, rtol=0, atol=1e-6, msg=n)
    report = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]
    assert sorted(report["thresholds"]["math"]) == sorted(f"{gradient(0.2, 0.6)(f'model.layers.{k}.'):.6g}"
                                                          for k in range(LAYERS))
    assert isinstance(report["thresholds"]["code"], float)


def test_plan_explains_and_lists_dp_schedules(tmp_path: Path, deep: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: x, op: dpa_amplify, input: d, partitions: [{{density: [0.1, 0.4], scale: 2}}, {{density: 0.5, scale: 1}}]}}
          - {{id: out, op: save, input: x, path: {tmp_path / 'out'}}}
        """)
    assert main(["plan", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "schedule: partitions.0.density layers.1: 0.2" in text and "partitions.0.density layers.3: 0.4" in text
    assert main(["plan", str(recipe), "--explain", "model.layers.2.mlp.up_proj.weight"]) == 0
    text = capsys.readouterr().out
    assert "partitions.0.density d=0.3, partitions.1.density d=0.5; module density = d + 0.08 x" in text, text
    assert "(scheduled)" in text
    assert main(["plan", str(recipe), "--explain", "model.norm.weight"]) == 0
    assert "dense: not a decoder linear weight, multiplied by dense_scale 2" in capsys.readouterr().out


def test_scheduled_partitions_must_ascend_for_every_tensor(tmp_path: Path, deep: dict[str, Path]) -> None:
    """Each anchor is valid and the validation probes ascend, but on the MLP weights the first partition's
    density passes the second's."""
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: x, op: dpa_amplify, input: d, partitions: [
              {{density: [{{filter: mlp, value: 0.3}}, {{value: 0.1}}], scale: 2}},
              {{density: [{{filter: self_attn, value: 0.35}}, {{value: 0.2}}], scale: 1}}]}}
          - {{id: out, op: save, input: x, path: {tmp_path / 'out'}}}
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:6:\d+: step 'x': at tensor 'model.layers.0.mlp.[a-z_.]+' the "
                                          "scheduled values break a rule: .*strictly ascending"):
        api.plan_recipe(recipe)
    assert not (tmp_path / "out").exists()


def test_partitions_filtered_apart_are_checked_only_as_tensors_get_them(tmp_path: Path, deep: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Partition 0's density is scheduled on the MLP weights, partition 1's on attention: the first anchors
    (0.5, 0.3) are no tensor's pair (MLP: 0.5 < 0.6, attention: 0.1 < 0.3)."""
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: x, op: dpa_amplify, input: d, select: magnitude, partitions: [
              {{density: [{{filter: mlp, value: 0.5}}, {{value: 0.1}}], scale: 2}},
              {{density: [{{filter: self_attn, value: 0.3}}, {{value: 0.6}}], scale: 1}}]}}
          - {{id: out, op: save, input: x, path: {tmp_path / 'out'}}}
        """)
    assert main(["validate", str(recipe), "-q"]) == 0
    for tensor, pair in (("model.layers.1.mlp.up_proj.weight", "0.5, 0.6"),
                         ("model.layers.1.self_attn.q_proj.weight", "0.1, 0.3")):
        assert main(["plan", str(recipe), "--explain", tensor]) == 0
        assert f"partition densities {pair} of the tensor's magnitude ranking" in capsys.readouterr().out, tensor
    api.run_recipe(recipe)
    kept = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]["kept"]
    numel = SHAPE.hidden_size * SHAPE.intermediate_size
    assert kept["model.layers.1.mlp.up_proj.weight"] == [numel // 2, numel - math.floor(numel * 0.4)]


def test_unfiltered_partition_schedules_are_still_refused_at_validation(tmp_path: Path, deep: dict[str, Path]) -> None:
    """Gradients pair anchors by depth, so their last layer's (0.4, 0.3) is refused before tensors are known."""
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {deep['base']}}}
          - {{id: math, op: load, model: {deep['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: x, op: dpa_amplify, input: d, partitions: [{{density: [0.1, 0.4], scale: 2}},
                                                         {{density: [0.2, 0.3], scale: 1}}]}}
          - {{id: out, op: save, input: x, path: {tmp_path / 'out'}}}
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:5:52: step 'x': field 'partitions': "
                                          r"partition densities must be strictly ascending, got \[0.4, 0.3\]"):
        load_recipe(recipe)
