"""dp_prune and dpa_amplify end to end through the engine, against a direct (whole-model) DP."""

from __future__ import annotations

import json

import torch
from conftest import load_and_diff_steps, load_tensors, read_folder, write_recipe
from test_kernels_dppa import reference_dp

from mergeengine import api
from mergeengine.kernels.dp_density import dp_keep_mask


def load(folder):
    return load_tensors(folder, as_float=True)


def deltas(models, name="math32"):
    b, f = load(models["base32"]), load(models[name])
    return b, {n: f[n] - b[n] for n in b}


def run(tmp_path, models, step: str, out="out") -> dict[str, torch.Tensor]:
    r = write_recipe(
        tmp_path,
        f"""
        steps:
          - {{id: base, op: load, model: {models["base32"]}}}
          - {{id: math, op: load, model: {models["math32"]}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {step}
          - {{id: out, op: save, input: x, path: {out}}}
        """,
    )
    api.run_recipe(r, overwrite=True)
    return read_folder(tmp_path / out)


def test_dp_prune_matches_whole_model_reference(tmp_path, models):
    out = run(
        tmp_path,
        models,
        "{id: x, op: dp_prune, input: d, density: 0.3, lamda: 0.08, module_threshold: 5, layer_threshold: 3}",
    )
    base, d = deltas(models)
    module_d, pruned = reference_dp(d, 0.3, 0.08, 5, 3)
    assert len(pruned) == 14
    for n in base:
        expected = base[n] + (pruned[n] if n in pruned else d[n])  # save writes base + delta
        torch.testing.assert_close(out[n], expected, atol=0, rtol=0)
    report = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]
    mod = report["layers"]["model.layers.1"]["modules"]["mlp.up_proj"]
    name = "model.layers.1.mlp.up_proj.weight"
    assert abs(mod["density"] - module_d[name]) < 1e-12
    assert mod["kept"] == int(torch.count_nonzero(pruned[name]))
    assert report["target_density"] == 0.3 and "outlier_ratio" in report["layers"]["model.layers.0"]


def test_dpa_amplify_partitions_nested_and_dense_scale(tmp_path, models):
    out = run(
        tmp_path,
        models,
        "{id: x, op: dpa_amplify, input: d, partitions: [{density: 0.1, scale: 1.8}, "
        "{density: 0.2, scale: 1.0}], dense_scale: 1.5}",
    )
    base, d = deltas(models)
    d01, _ = reference_dp(d, 0.1, 0.08, 5, 3)
    d02, _ = reference_dp(d, 0.2, 0.08, 5, 3)
    for n in base:
        got = out[n] - base[n]
        if n not in d01:
            torch.testing.assert_close(got, 1.5 * d[n], atol=1e-6, rtol=1e-6)
            continue
        inner, outer = dp_keep_mask(d[n], d01[n]), dp_keep_mask(d[n], d02[n])
        assert bool((inner <= outer).all())  # nested
        expected = torch.where(inner, 1.8 * d[n], torch.where(outer, d[n], 0.0))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_dpa_release_factors_and_dense_max(tmp_path, models):
    out = run(
        tmp_path,
        models,
        "{id: x, op: dpa_amplify, input: d, factors: release, partitions: "
        "[{density: 0.1, scale: 1.0}, {density: 0.2, scale: 1.5}]}",
    )
    base, d = deltas(models)
    d01, _ = reference_dp(d, 0.1, 0.08, 5, 3)
    d02, _ = reference_dp(d, 0.2, 0.08, 5, 3)
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb] - base[emb], 1.5 * d[emb], atol=1e-6, rtol=1e-6)  # max factor
    n = "model.layers.0.mlp.gate_proj.weight"
    outer = dp_keep_mask(d[n], d02[n])
    # release: partition 1 gets max(1.0, 1.5) = 1.5, partition 2 gets 1.5: every kept entry x1.5
    torch.testing.assert_close(out[n] - base[n], torch.where(outer, 1.5 * d[n], 0.0), atol=1e-6, rtol=1e-6)


def test_dpa_magnitude_selection(tmp_path, models):
    out = run(
        tmp_path,
        models,
        "{id: x, op: dpa_amplify, input: d, select: magnitude, partitions: "
        "[{density: 0.1, scale: 2.0}, {density: 0.3, scale: 1.0}]}",
    )
    base, d = deltas(models)
    n = "model.layers.1.self_attn.o_proj.weight"
    inner, outer = dp_keep_mask(d[n], 0.1), dp_keep_mask(d[n], 0.3)
    torch.testing.assert_close(
        out[n] - base[n], torch.where(inner, 2 * d[n], torch.where(outer, d[n], 0.0)), atol=1e-6, rtol=1e-6
    )
    report = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]
    assert report["select"] == "magnitude" and n in report["kept"]


def test_plan_lists_the_prunable_groups(tmp_path, models, capsys):
    from mergeengine.cli import main

    r = write_recipe(
        tmp_path,
        f"""
        steps:
          - {{id: base, op: load, model: {models["base"]}}}
          - {{id: math, op: load, model: {models["math"]}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: p, op: dp_prune, input: d, density: 0.2}}
          - {{id: out, op: save, input: p, path: out}}
        """,
    )
    assert main(["plan", str(r)]) == 0
    text = capsys.readouterr().out
    assert "decoder linear weights: 14 tensors in 2 layers" in text
    assert "passes: 3 (statistics p/magnitude sums; statistics p/outlier counts; merge)" in text


def test_clamping_warns_with_step_name(tmp_path, models, caplog):
    run(tmp_path, models, "{id: x, op: dp_prune, input: d, density: 0.02, lamda: 0.5}")
    assert any("step 'x'" in r.message and "clamped" in r.message for r in caplog.records)
    report = json.loads((tmp_path / "out" / "dppa_report.json").read_text())["x"]
    assert report["clamped"]


def test_dp_ops_read_a_plain_diff_directly_with_the_same_bytes(tmp_path, models):
    """dpa_amplify/dp_prune on a plain diff read model and base themselves (statistics computed
    chunk by chunk, no float32 delta per pass); the bytes equal the unfused run's."""
    for op in ["{id: x, op: dpa_amplify, input: d, partitions: [{density: 0.1, scale: 2.0}, {density: 0.3, scale: 1.0}]}",
               "{id: x, op: dp_prune, input: d, density: 0.2}"]:
        outs = {}
        for vocab in ["error", "truncate"]:  # a diff with a vocab policy is not fused
            r = write_recipe(tmp_path, f"""
                steps:
                  - {{id: base, op: load, model: {models["base"]}}}
                  - {{id: math, op: load, model: {models["math"]}}}
                  - {{id: d, op: diff, model: math, base: base, vocab: {vocab}}}
                  - {op}
                  - {{id: out, op: save, input: x, path: out_{vocab}}}
                """)
            result = api.run_recipe(r, overwrite=True)
            assert bool(result.plan.step_plans["x"].read_from) == (vocab == "error")
            outs[vocab] = read_folder(tmp_path / f"out_{vocab}")
        assert outs["error"].keys() == outs["truncate"].keys()
        for n, t in outs["error"].items():
            assert torch.equal(t, outs["truncate"][n]), n


def test_dpa_amplify_fused_into_task_arithmetic_gives_the_same_bytes(tmp_path, models):
    """A dpa_amplify used only by a task_arithmetic merge is amplified chunk by chunk inside the
    merge (no amplified delta stored). Saving the amplified deltas too turns the fusion off: the
    merged bytes, the DPPA report and the bf16 output must not change."""
    from mergeengine.ops import chunks as merge_module

    text = f"""
        name: t
        steps:
{load_and_diff_steps(models)}
          - {{id: a1, op: dpa_amplify, input: d_math, partitions: [{{density: 0.1, scale: 1.8}}, {{density: 0.3, scale: 1.0}}]}}
          - {{id: a2, op: dpa_amplify, input: d_code, partitions: [{{density: 0.2, scale: 2.0}}, {{density: 0.4, scale: 0.0}}]}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [a1, a2], weights: [0.7, 0.5], lambda: 0.9}}
          - {{id: out, op: save, input: m, path: OUT, dtype: bfloat16}}
        """
    merge_module.CHUNK_NUMEL, old = 1 << 10, merge_module.CHUNK_NUMEL  # several chunks per tensor
    try:
        fused = api.run_recipe(write_recipe(tmp_path, text.replace("OUT", "fused"), "fused.yaml"))
        unfused = api.run_recipe(write_recipe(tmp_path, text.replace("OUT", "plain") + """
          - {id: s1, op: save, input: a1, path: a1}
          - {id: s2, op: save, input: a2, path: a2}
        """, "plain.yaml"))
    finally:
        merge_module.CHUNK_NUMEL = old
    assert set(fused.plan.step_plans["m"].fused) == {"a1", "a2"} and not unfused.plan.step_plans["m"].fused
    assert any("chunk by chunk" in n for n in fused.plan.ops["m"].plan_notes(fused.plan.step_plans["m"]))
    assert not [k for k in fused.plan.order if k.step in ("a1", "a2") and k.kind == "compute"]
    a, b = read_folder(tmp_path / "fused"), read_folder(tmp_path / "plain")
    assert set(a) == set(b) and all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a)
    ra = json.loads((tmp_path / "fused" / "dppa_report.json").read_text())
    rb = json.loads((tmp_path / "plain" / "dppa_report.json").read_text())
    assert ra == rb and set(ra) == {"a1", "a2"}
    assert fused.stats.peak_live_bytes < unfused.stats.peak_live_bytes
