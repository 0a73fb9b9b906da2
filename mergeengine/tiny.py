"""Tiny, real Llama-shaped checkpoints for examples, tests and benchmarks.

``python -m mergeengine.tiny DIR`` writes a base model and three fine-tunes (``math``, ``code``,
``chat``) under DIR, each a folder transformers can load (config.json + safetensors).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-family model."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 128
    tie_word_embeddings: bool = False

    def config(self, dtype: torch.dtype) -> dict:
        """A LlamaConfig-compatible config.json."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor names -> shapes."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


def make_weights(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights (norms near 1, matrices with std 0.02), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) == 1:
            out[name] = 1.0 + 0.01 * torch.randn(s, generator=g)
        else:
            out[name] = 0.02 * torch.randn(s, generator=g)
    return out


def fine_tune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.002) -> dict[str, torch.Tensor]:
    """A fake fine-tune: the base plus a seeded delta, heavier-tailed than Gaussian (like real deltas)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        noise = torch.randn(t.shape, generator=g)
        outliers = (torch.rand(t.shape, generator=g) < 0.01).float() * 8.0 * torch.randn(t.shape, generator=g)
        out[name] = t + scale * (noise + outliers)
    return out


def write_checkpoint(
    folder: Path,
    weights: dict[str, torch.Tensor],
    shape: LlamaShape,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + model.safetensors (or shards + index when ``max_shard_bytes`` is set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_example_models(root: Path, shape: LlamaShape | None = None, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Base + three fine-tunes (math, code, chat) under ``root``; returns their folders."""
    shape = shape or LlamaShape()
    base = make_weights(shape, seed=0)
    folders = [write_checkpoint(Path(root) / "base", base, shape, dtype=dtype)]
    for i, name in enumerate(["math", "code", "chat"], start=1):
        folders.append(write_checkpoint(Path(root) / name, fine_tune(base, seed=i), shape, dtype=dtype))
    return folders


def main(argv: list[str] | None = None) -> int:
    """``python -m mergeengine.tiny DIR [--layers N]``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    folders = write_example_models(args.root, LlamaShape(num_hidden_layers=args.layers))
    print(f"wrote {len(folders)} tiny Llama checkpoints under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
