"""Output bytes of every example recipe (and a few variants) on deterministic tiny models.

``python tests/golden.py`` rewrites ``tests/data/golden_sha256.json``; ``test_golden.py`` checks
that a run reproduces it. Two model sets: the example shape (every tensor below one merge chunk)
and a wider one whose large tensors take the multi-chunk and sampled-selection paths.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from mergeengine import api
from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint, write_example_models

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "data" / "golden_sha256.json"
SHAPES = {
    "tiny": LlamaShape(),
    # 1M-entry embeddings and MLP weights: several chunks, sampled top-k windows
    "wide": LlamaShape(hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=2048),
}
#: Variants the examples do not reach: models as merge inputs, l1 rescale, weighted votes, lists.
VARIANTS = {
    "ta_models.yaml": """
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: code, op: load, model: ./models/code}
  - {id: merged, op: merge, method: task_arithmetic, base: base, inputs: [math, code], weights: [0.6, 0.4]}
  - {id: out, op: save, input: merged, path: ./out/ta_models, dtype: float32}
""",
    "dare_l1.yaml": """
seed: 3
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: code, op: load, model: ./models/code}
  - {id: d_code, op: diff, model: code, base: base}
  - {id: merged, op: merge, method: dare_ties, base: base, inputs: [math, d_code], density: [0.3, 0.5],
     rescale: l1, vote: weighted, weights: [1.0, 0.5], lambda: 0.8}
  - {id: out, op: save, input: merged, path: ./out/dare_l1}
""",
    "dare_linear_none.yaml": """
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: chat, op: load, model: ./models/chat}
  - {id: merged, op: merge, method: dare_linear, base: base, inputs: [math, chat], density: 0.5, rescale: none}
  - {id: out, op: save, input: merged, path: ./out/dare_linear_none}
""",
    "ties_weighted.yaml": """
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: code, op: load, model: ./models/code}
  - {id: chat, op: load, model: ./models/chat}
  - {id: d_chat, op: diff, model: chat, base: base}
  - {id: p_chat, op: magnitude_prune, input: d_chat, density: 0.5}
  - {id: merged, op: merge, method: ties, base: base, inputs: [math, code, p_chat], density: [0.1, 0.2, 0.4],
     vote: weighted, weights: [1.0, 0.5, 2.0], lambda: 1.2}
  - {id: out, op: save, input: merged, path: ./out/ties_weighted, dtype: float16}
""",
    "breadcrumbs_lists.yaml": """
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: code, op: load, model: ./models/code}
  - {id: merged, op: merge, method: breadcrumbs, base: base, inputs: [math, code], density: [0.2, 0.4],
     gamma: 0.05, weights: [0.5, 1.5]}
  - {id: out, op: save, input: merged, path: ./out/breadcrumbs_lists, dtype: bfloat16}
""",
    "vocab_pad.yaml": """
seed: 1
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: big, op: load, model: ./models/big_vocab}
  - {id: code, op: load, model: ./models/code}
  - {id: ta, op: merge, method: task_arithmetic, base: base, inputs: [big, code], vocab: pad_base, lambda: 0.9}
  - {id: ti, op: merge, method: ties, base: base, inputs: [big, code], vocab: pad_base, density: 0.3}
  - {id: dt, op: merge, method: dare_ties, base: base, inputs: [big, code], vocab: pad_base, density: 0.4}
  - {id: dl, op: merge, method: dare_linear, base: base, inputs: [big, code], vocab: truncate, density: 0.4,
     rescale: l1}
  - {id: bc, op: merge, method: breadcrumbs, base: base, inputs: [big, code], vocab: truncate, density: 0.3}
  - {id: out_ta, op: save, input: ta, path: ./out/vocab_ta}
  - {id: out_ti, op: save, input: ti, path: ./out/vocab_ti}
  - {id: out_dt, op: save, input: dt, path: ./out/vocab_dt, dtype: float32}
  - {id: out_dl, op: save, input: dl, path: ./out/vocab_dl}
  - {id: out_bc, op: save, input: bc, path: ./out/vocab_bc}
""",
    "dpa_shared.yaml": """
steps:
  - {id: base, op: load, model: ./models/base}
  - {id: math, op: load, model: ./models/math}
  - {id: code, op: load, model: ./models/code}
  - {id: d_math, op: diff, model: math, base: base}
  - {id: a_math, op: dpa_amplify, input: d_math, partitions: [{density: 0.1, scale: 2.0}, {density: 0.3, scale: 1.0}],
     factors: release, dense_scale: 1.5}
  - {id: m_math, op: dpa_amplify, input: d_math, select: magnitude, partitions: [{density: 0.2, scale: 1.5}]}
  - {id: merged, op: merge, method: task_arithmetic, base: base, inputs: [a_math, code, m_math], weights: [1, 1, 0.5]}
  - {id: out, op: save, input: merged, path: ./out/dpa_shared}
  - {id: out2, op: save, input: a_math, path: ./out/dpa_shared_delta, dtype: float32}
""",
}
#: Files whose bytes do not depend on where the run happened (the card and provenance hold paths).
SKIP = {"README.md", "mergeengine.json"}


def recipes(root: Path) -> list[Path]:
    """The example recipes and the variants, copied beside ``root/models``."""
    out = []
    for p in EXAMPLES:
        shutil.copy(p, root / p.name)
        out.append(root / p.name)
    for name, text in VARIANTS.items():
        (root / name).write_text(text)
        out.append(root / name)
    return out


def output_hashes(root: Path, shape: LlamaShape) -> dict[str, dict[str, str]]:
    """Recipe file name -> output file (relative) -> sha256, for models of ``shape`` under ``root``."""
    write_example_models(root / "models", shape)
    write_big_vocab(root / "models" / "big_vocab", shape)
    result: dict[str, dict[str, str]] = {}
    for recipe in recipes(root):
        run = api.run_recipe(recipe, overwrite=True)
        files: dict[str, str] = {}
        for save, folder in sorted(run.outputs.items()):
            for f in sorted(folder.rglob("*")):
                if f.is_file() and f.name not in SKIP:
                    files[f"{save}/{f.relative_to(folder)}"] = hashlib.sha256(f.read_bytes()).hexdigest()
        result[recipe.name] = files
    return result


def write_big_vocab(folder: Path, shape: LlamaShape, extra_rows: int = 8) -> Path:
    """A fine-tune of the example base with ``extra_rows`` more embedding and lm_head rows."""
    import dataclasses

    import torch

    weights = fine_tune(make_weights(shape, seed=0), seed=7)
    g = torch.Generator().manual_seed(7)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = weights[name]
        weights[name] = torch.cat([t, 0.02 * torch.randn((extra_rows, t.shape[1]), generator=g)])
    big = dataclasses.replace(shape, vocab_size=shape.vocab_size + extra_rows)
    return write_checkpoint(folder, weights, big, dtype=torch.bfloat16)


def main() -> int:
    """Write :data:`GOLDEN` from runs under a temporary folder."""
    import tempfile

    data = {}
    for label, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            data[label] = output_hashes(Path(tmp), shape)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
