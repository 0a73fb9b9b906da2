"""DP on MoE checkpoints: fused 3-D expert tensors and per-expert 2-D weights give the same DP.

Each expert slice ``[e]`` of ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj``
[E, H, I] is one DP module, exactly as ``mlp.experts.{e}.gate_up_proj.weight`` is in the
per-expert layout; biases (GPT-OSS's 2-D ``*_proj_bias`` included) and the router ``mlp.gate``
stay dense. Checked end to end against the whole-model reference DP of test_kernels_dppa.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_folder, write_recipe
from safetensors.torch import save_file
from test_kernels_dppa import reference_dp

from mergeengine import api
from mergeengine.cli import main
from mergeengine.kernels.dp_groups import dp_module_groups

E, H, INTER, LAYERS, VOCAB = 4, 16, 12, 2, 32


def _weights(seed: int) -> dict[str, torch.Tensor]:
    """A fused-layout MoE model: attention, router, fused experts with GPT-OSS-style 2-D biases."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.02

    w = {"model.embed_tokens.weight": rnd(VOCAB, H), "model.norm.weight": torch.ones(H), "lm_head.weight": rnd(VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": torch.ones(H), p + "self_attn.q_proj.weight": rnd(H, H),
              p + "self_attn.o_proj.weight": rnd(H, H), p + "mlp.gate.weight": rnd(E, H),
              p + "mlp.experts.gate_up_proj": rnd(E, 2 * INTER, H), p + "mlp.experts.gate_up_proj_bias": rnd(E, 2 * INTER),
              p + "mlp.experts.down_proj": rnd(E, H, INTER), p + "mlp.experts.down_proj_bias": rnd(E, H)}
    return w


def _fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in base.items():
        noise = torch.randn(t.shape, generator=g) * 0.01
        noise[noise.abs() > 0.024] *= 6  # a few outliers, so DP's offsets are not all 0
        out[n] = t + noise
    return out


def _per_expert(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in the per-expert layout (2-D weights, 1-D biases)."""
    out = {}
    for n, t in fused.items():
        if ".mlp.experts." not in n:
            out[n] = t
            continue
        prefix, proj = n.split(".mlp.experts.")
        for e in range(E):
            if proj.endswith("_bias"):
                out[f"{prefix}.mlp.experts.{e}.{proj.removesuffix('_bias')}.bias"] = t[e].clone()
            else:
                out[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = t[e].clone()
    return out


def _write(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = _weights(0)
    ft = _fine_tune(base, 1)
    return {"base": _write(root / "base", base), "ft": _write(root / "ft", ft),
            "base_pe": _write(root / "base_pe", _per_expert(base)), "ft_pe": _write(root / "ft_pe", _per_expert(ft))}


def _run(tmp_path: Path, moe: dict[str, Path], layout: str, step: str) -> tuple[dict[str, torch.Tensor], dict]:
    suffix = "" if layout == "fused" else "_pe"
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {moe['base' + suffix]}}}
          - {{id: ft, op: load, model: {moe['ft' + suffix]}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {step}
          - {{id: out, op: save, input: x, path: out_{layout}}}
        """, name=f"{layout}.yaml")
    api.run_recipe(r, overwrite=True)
    folder = tmp_path / f"out_{layout}"
    return read_folder(folder), json.loads((folder / "dppa_report.json").read_text())["x"]


def _module_densities(report: dict) -> dict[str, float]:
    """Module density per module, keyed by layer + module with the expert index in one spelling."""
    out = {}
    for layer, entry in (report.get("partitions", [report])[-1])["layers"].items():
        for module, m in entry["modules"].items():
            out[f"{layer}.{_normal(module)}"] = m["density"]
    return out


def _normal(module: str) -> str:
    """``mlp.experts.down_proj[3]`` and ``mlp.experts.3.down_proj`` both as ``mlp.experts.3.down_proj``."""
    if module.endswith("]"):
        head, e = module[:-1].split("[")
        prefix, proj = head.rsplit(".", 1)
        return f"{prefix}.{e}.{proj}"
    return module


def test_grouping_slices_fused_experts_and_keeps_biases_and_router_dense(moe) -> None:
    from safetensors import safe_open

    with safe_open(str(moe["base"] / "model.safetensors"), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    groups = dp_module_groups(shapes)
    assert sorted(groups.fused) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS)
                                          for p in ("gate_up_proj", "down_proj"))
    assert groups.slices["model.layers.1.mlp.experts.down_proj"] == [
        f"model.layers.1.mlp.experts.down_proj[{e}]" for e in range(E)]
    assert groups.units["model.layers.1.mlp.experts.down_proj[2]"] == ("model.layers.1", "mlp.experts.down_proj[2]")
    assert len(groups.units) == LAYERS * (2 + 2 * E)
    dense = set(shapes) - set(groups.slices)
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj_bias",
            "model.layers.0.mlp.experts.down_proj_bias", "lm_head.weight"} <= dense


def test_plan_lists_the_expert_grouping(tmp_path, moe, capsys) -> None:
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {moe['base']}}}
          - {{id: ft, op: load, model: {moe['ft']}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: x, op: dp_prune, input: d, density: 0.3}}
          - {{id: out, op: save, input: x, path: out}}
        """)
    assert main(["plan", str(r)]) == 0
    text = capsys.readouterr().out
    assert "decoder linear weights: 8 tensors in 2 layers" in text
    assert f"fused experts: 4 3-D tensors with {E} experts each; each expert slice [e] is one DP module (20 modules" in text


@pytest.mark.parametrize("rule", ["exact", "release"])
def test_dp_prune_same_densities_and_weights_in_both_layouts(tmp_path, moe, rule) -> None:
    step = f"{{id: x, op: dp_prune, input: d, density: 0.3, prune_rule: {rule}}}"
    fused, fused_report = _run(tmp_path, moe, "fused", step)
    per, per_report = _run(tmp_path, moe, "per_expert", step)
    assert _module_densities(fused_report) == _module_densities(per_report)
    assert len(_module_densities(fused_report)) == LAYERS * (2 + 2 * E)
    for n, t in _per_expert(fused).items():
        assert torch.equal(t, per[n]), n
    if rule == "exact":  # the whole-model reference DP of test_kernels_dppa, on the per-expert deltas
        b, f = _load(moe["base_pe"]), _load(moe["ft_pe"])
        deltas = {n: f[n] - b[n] for n in b if n.endswith(".weight") and "layers." in n
                  and b[n].dim() == 2 and ".mlp.gate." not in n}
        _, pruned = reference_dp(deltas, 0.3, 0.08, 5, 3)
        for n, p in pruned.items():
            assert torch.equal(per[n], b[n] + p), n
    b, f = _load(moe["base"]), _load(moe["ft"])
    for dense in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj_bias"):
        assert torch.equal(fused[dense], b[dense] + (f[dense] - b[dense])), dense  # passed through dense
    slice_ = fused["model.layers.0.mlp.experts.down_proj"] - b["model.layers.0.mlp.experts.down_proj"]
    kept = [float((slice_[e] != 0).float().mean()) for e in range(E)]
    assert all(0.15 < k < 0.45 for k in kept), kept  # every expert pruned, each at its own density


def test_dpa_amplify_same_in_both_layouts_and_experts_not_scaled_densely(tmp_path, moe) -> None:
    step = ("{id: x, op: dpa_amplify, input: d, partitions: [{density: 0.1, scale: 2.0}, {density: 0.3, scale: 1.0}], "
            "dense_scale: 1.5, prune_rule: release}")
    fused, fused_report = _run(tmp_path, moe, "fused", step)
    per, per_report = _run(tmp_path, moe, "per_expert", step)
    assert _module_densities(fused_report) == _module_densities(per_report)
    for n, t in _per_expert(fused).items():
        assert torch.equal(t, per[n]), n
    b, f = _load(moe["base"]), _load(moe["ft"])
    name = "model.layers.1.mlp.experts.gate_up_proj"
    out_delta = fused[name] - b[name]
    assert float((out_delta != 0).float().mean()) < 0.45  # pruned, not multiplied by the dense factor
    router = "model.layers.1.mlp.gate.weight"
    torch.testing.assert_close(fused[router] - b[router], 1.5 * (f[router] - b[router]))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
