"""``model+lora`` references: a peft LoRA adapter applied per tensor, checked against W + B·A·scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeengine.api import run_recipe
from mergeengine.errors import ModelError
from mergeengine.io.lora import lora_scale, split_lora_reference
from mergeengine.recipe.loader import parse_recipe
from tests.conftest import load_tensors, read_folder, write_recipe

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_adapter(folder: Path, model: Path, *, r: int = 4, alpha: float = 8.0, rslora: bool = False,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft-format adapter (names as peft saves them) for TARGETS of every layer of ``model``."""
    weights = load_tensors(model)
    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if not module.endswith(TARGETS):
            continue
        a = torch.randn(r, w.shape[1], generator=g) * 0.1
        b = torch.randn(w.shape[0], r, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        factors[name] = (a, b)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return factors


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_reference_is_w_plus_ba_scale(models: dict[str, Path], tmp_path: Path, rslora: bool) -> None:
    factors = write_adapter(tmp_path / "adapter", models["base32"], rslora=rslora)
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: m, op: load, model: "{models['base32']}+{tmp_path / 'adapter'}"}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}, dtype: float32}}
        """)
    run_recipe(recipe)
    got = read_folder(tmp_path / "out")
    base = load_tensors(models["base32"])
    scale = 8.0 / math.sqrt(4) if rslora else 8.0 / 4
    assert set(got) == set(base)
    for name, w in base.items():
        if name in factors:
            a, b = factors[name]
            want = w.double() + (b.double() @ a.double()) * scale
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[name], w), name
    assert len(factors) == 6  # three modules in each of the two layers


def test_lora_reference_in_a_merge(models: dict[str, Path], tmp_path: Path) -> None:
    """A LoRA-adapted model used as a merge input: base + 0.5 (W + BA·s − base), per tensor."""
    factors = write_adapter(tmp_path / "ad", models["math32"], seed=3)
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: ft, op: load, model: "{models['math32']}+{tmp_path / 'ad'}"}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], lambda: 0.5}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}, dtype: float32}}
        """)
    run_recipe(recipe)
    got = read_folder(tmp_path / "out")
    base, ft = load_tensors(models["base32"]), load_tensors(models["math32"])
    for name in base:
        adapted = ft[name].double()
        if name in factors:
            a, b = factors[name]
            adapted = adapted + (b.double() @ a.double()) * 2.0
        want = base[name].double() + 0.5 * (adapted - base[name].double())
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)


def test_scale_patterns_and_reference_split() -> None:
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.0.v_proj": 2}}
    assert lora_scale(cfg, "model.layers.0.k_proj") == 2.0
    assert lora_scale(cfg, "model.layers.0.q_proj") == 4.0
    assert lora_scale(cfg, "model.layers.0.v_proj") == 0.25
    assert lora_scale({**cfg, "use_rslora": True}, "x.k_proj") == 16 / math.sqrt(8)
    assert split_lora_reference("org/model+org/adapter") == ("org/model", "org/adapter")
    assert split_lora_reference("./plain") == ("./plain", None)


def _recipe_for(tmp_path: Path, model: str) -> str:
    return f"""
        steps:
          - {{id: m, op: load, model: "{model}"}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}}}
        """


def test_bad_adapters_are_one_line_errors(models: dict[str, Path], tmp_path: Path) -> None:
    ad = tmp_path / "ad"
    write_adapter(ad, models["base32"])
    names = load_tensors(models["base32"])
    # a factor without its partner
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="lora_A but not its partner"):
        run_recipe(parse_recipe(_recipe_for(tmp_path, f"{models['base32']}+{ad}"), str(tmp_path / "r.yaml")))
    # factors that do not fit the weight
    q = "model.layers.0.self_attn.q_proj"
    save_file({f"base_model.model.{q}.lora_A.weight": torch.zeros(4, 64),
               f"base_model.model.{q}.lora_B.weight": torch.zeros(63, 4)}, str(ad / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match=r"do not fit its shape \[64, 64\]"):
        run_recipe(parse_recipe(_recipe_for(tmp_path, f"{models['base32']}+{ad}"), str(tmp_path / "r.yaml")))
    assert f"{q}.weight" in names
    # not an adapter folder
    with pytest.raises(ModelError, match="adapter_config.json"):
        run_recipe(parse_recipe(_recipe_for(tmp_path, f"{models['base32']}+{models['math32']}"),
                                str(tmp_path / "r.yaml")))
    assert not (tmp_path / "out").exists()
