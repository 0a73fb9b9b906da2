"""GGUFCheckpoint: names, shapes, dequantized values and the rebuilt HF folder, checked against transformers.

The reference is transformers' own GGUF loader. ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``
needs ``accelerate``, which the dev environment lacks, so the reference model is assembled the way
that path does it for Llama (``load_gguf_checkpoint(..., model_to_load=model)``, then loading the
resulting state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from conftest import smollm2_or_skip  # noqa: E402

from mergeengine.errors import ModelError  # noqa: E402
from mergeengine.io.gguf_reader import GGUFCheckpoint, unpermute_qk  # noqa: E402

PROMPT = "The capital of France is"
SENTENCE = "Hello world! Merging models, 12345 times.  <|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the SmolLM2-135M-Instruct Q4_1 GGUF (a symlink to the packaged file)."""
    src = smollm2_or_skip()
    folder = tmp_path_factory.mktemp("gguf_src")
    try:
        (folder / src.name).symlink_to(src)
    except OSError:
        return src
    return folder / src.name


@pytest.fixture(scope="module")
def ckpt(smollm2_gguf: Path):
    c = GGUFCheckpoint(smollm2_gguf)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path):
    """(state dict, model, tokenizer) as transformers builds them from the GGUF."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch.set_num_threads(1)
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embeddings
    model.tie_weights()
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return tensors, model, tokenizer


def test_names_and_shapes_match_transformers(ckpt: GGUFCheckpoint, reference) -> None:
    tensors, _, _ = reference
    infos = ckpt.tensors()
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert all(i.dtype == torch.float32 for i in infos.values())
    assert list(infos)[:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert list(infos)[-1] == "model.norm.weight"
    assert "lm_head.weight" not in infos  # tied: not invented
    assert ckpt.config()["tie_word_embeddings"] is True
    assert ckpt.weight_files() == [ckpt.path]


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted with n_head
        "model.layers.7.self_attn.k_proj.weight",  # Q4_1, permuted with n_head_kv (GQA)
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",  # Q8_0
        "model.norm.weight",  # F32
    ],
)
def test_read_matches_transformers_dequantization(ckpt: GGUFCheckpoint, reference, name: str) -> None:
    tensors, _, _ = reference
    got = ckpt.read(name)
    assert got.dtype == torch.float32 and tuple(got.shape) == ckpt.tensors()[name].shape
    torch.testing.assert_close(got, tensors[name].float(), atol=1e-6, rtol=0)


def test_rebuilt_folder_loads_and_matches_logits(ckpt: GGUFCheckpoint, reference, tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import save_file

    _, ref_model, ref_tok = reference
    save_file({n: ckpt.read(n) for n in ckpt.tensors()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ckpt.config(), indent=2))
    written = ckpt.write_support_files(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(written)
    assert all((tmp_path / f).is_file() for f in written)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path), local_files_only=True)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    assert tok.eos_token == ref_tok.eos_token == "<|im_end|>"
    assert tok.chat_template == ref_tok.chat_template

    assert tok(SENTENCE).input_ids == ref_tok(SENTENCE).input_ids
    ids = ref_tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(ids).logits
        want = ref_model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_read_returns_own_memory(ckpt: GGUFCheckpoint) -> None:
    # F32 tensors dequantize to a view of the read-only memory map; read() must hand back a copy.
    first = ckpt.read("model.norm.weight")
    first.add_(1.0)
    assert not torch.equal(first, ckpt.read("model.norm.weight"))


# ---------------------------------------------------------------- synthetic files (no model needed)


def _llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(
    path: Path, arch: str, tensors: dict[str, np.ndarray], heads: tuple[int, int] = (2, 1)
) -> None:
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(heads[0])
    w.add_head_count_kv(heads[1])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(gen: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-layout weights of a 1-layer Llama: hidden 8, 2 heads of 4, 1 kv head, untied head."""

    def r(*shape: int) -> np.ndarray:
        return gen.standard_normal(shape).astype(np.float32)

    return {
        "model.embed_tokens.weight": r(10, 8),
        "model.layers.0.self_attn.q_proj.weight": r(8, 8),
        "model.layers.0.self_attn.k_proj.weight": r(4, 8),
        "model.layers.0.self_attn.v_proj.weight": r(4, 8),
        "model.layers.0.self_attn.o_proj.weight": r(8, 8),
        "model.layers.0.mlp.gate_proj.weight": r(16, 8),
        "model.layers.0.mlp.up_proj.weight": r(16, 8),
        "model.layers.0.mlp.down_proj.weight": r(8, 16),
        "model.layers.0.input_layernorm.weight": r(8),
        "model.layers.0.post_attention_layernorm.weight": r(8),
        "model.norm.weight": r(8),
        "lm_head.weight": r(10, 8),
    }


def _to_gguf_names(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "blk.0.attn_q.weight": _llamacpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], 2, 2),
        "blk.0.attn_k.weight": _llamacpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], 2, 1),
        # stored as F16 to exercise that dequantization path
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"].astype(np.float16),
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
    }
    return g


def test_unpermute_inverts_llamacpp_permute() -> None:
    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for n_head in (1, 2, 3, 6):
        back = unpermute_qk(torch.from_numpy(_llamacpp_permute(w, n_head)), n_head)
        assert torch.equal(back, torch.from_numpy(w))
    bias = np.arange(24, dtype=np.float32)
    assert torch.equal(unpermute_qk(torch.from_numpy(_llamacpp_permute(bias, 3)), 3), torch.from_numpy(bias))
    with pytest.raises(ValueError):
        unpermute_qk(torch.zeros(6, 2), 2)


def test_synthetic_untied_llama_roundtrip(tmp_path: Path) -> None:
    hf = _tiny_llama(np.random.default_rng(0))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama", _to_gguf_names(hf))
    c = GGUFCheckpoint(path)
    assert list(c.tensors()) == list(hf)  # HF state-dict order
    for name, want in hf.items():
        got = c.read(name)
        if name.endswith("v_proj.weight"):
            want = want.astype(np.float16).astype(np.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(want)), name
    cfg = c.config()
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 4)
    sizes = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    assert sizes == (8, 16, 1, 10)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["max_position_embeddings"]) == (1e-6, 500000.0, 64)
    # no tokenizer metadata: only generation_config.json, and no crash
    assert c.write_support_files(tmp_path / "out")[0] == "generation_config.json"
    c.close()
    with pytest.raises(ModelError, match="closed"):
        c.read("model.norm.weight")


def test_garbage_file_is_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF") as info:
        GGUFCheckpoint(bad)
    assert "garbage.gguf" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def test_unsupported_architecture_is_model_error(tmp_path: Path) -> None:
    path = tmp_path / "bert.gguf"
    _write_gguf(path, "bert", {"token_embd.weight": np.zeros((10, 8), np.float32)})
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'bert'") as info:
        GGUFCheckpoint(path)
    assert "bert.gguf" in str(info.value)


def test_unsupported_quant_type_and_tensor_are_model_errors(tmp_path: Path) -> None:
    hf = _tiny_llama(np.random.default_rng(1))
    tensors = _to_gguf_names(hf)
    tensors["blk.0.ffn_up.weight"] = np.zeros((16, 8), np.int32)  # I32: not a type gguf dequantizes
    path = tmp_path / "int.gguf"
    _write_gguf(path, "llama", tensors)
    with pytest.raises(ModelError, match="unsupported GGUF quantization type I32"):
        GGUFCheckpoint(path)

    tensors = _to_gguf_names(hf)
    tensors["rope_freqs.weight"] = np.ones(2, np.float32)  # Llama 3 rope scaling: no HF tensor
    path = tmp_path / "rope.gguf"
    _write_gguf(path, "llama", tensors)
    with pytest.raises(ModelError, match="rope_freqs"):
        GGUFCheckpoint(path)
