"""Measure DP / DP+DPA on LLaMA-2-7B-shaped layers on this machine, to size the real 7B run.

    .venv/bin/python benchmarks/minipaper/scale_7b.py [--layers 1 2] [--work DIR]

Writes a random base (bfloat16, like Llama-2-7b-hf's float16 safetensors) and a random "fine-tune"
(float32, like Abel-7B-001's float32 shards) with the real shapes (hidden 4096, intermediate 11008,
vocabulary 32000) but only ``--layers`` decoder layers, runs ``mergeengine run`` on the DP and
DP+DPA recipes of ``recipes/paper/`` (same steps, local paths) and records wall time and peak
memory (peak anonymous memory too: RSS also counts the memory-mapped input pages). Two layer counts give a per-layer cost and a fixed cost (embeddings, lm_head, start-up),
which ``recipes/paper/README.md`` extrapolates to 32 layers. Results: ``WORK/scale_7b.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

from mergeengine.tiny import LlamaShape  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}


def write_pair(folder: Path, layers: int) -> tuple[Path, Path]:
    """Base (bf16) and fine-tune (fp32, delta std 0.004 plus 1% outliers x8) with ``layers`` layers."""
    shape = LlamaShape(num_hidden_layers=layers, **SHAPE_7B)
    base_dir, ft_dir = folder / "base", folder / "ft"
    if (ft_dir / "model.safetensors").is_file():
        return base_dir, ft_dir
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for name, s in shape.tensor_shapes().items():
        b = (1.0 + 0.01 * torch.randn(s, generator=g)) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)
        b = b.to(torch.bfloat16)
        d = 0.004 * torch.randn(s, generator=g)
        d += (torch.rand(s, generator=g) < 0.01) * 8 * d
        base[name], ft[name] = b, b.float() + d
    for path, tensors, dtype in ((base_dir, base, torch.bfloat16), (ft_dir, ft, torch.float32)):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(shape.config(dtype)))
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return base_dir, ft_dir


def recipe(base: Path, ft: Path, method: str, out: Path) -> str:
    """The paper recipe's steps (``recipes/paper/dp_abel_density0.2.yaml``, ``dpa_abel.yaml``) on local models."""
    if method == "dp":
        step = "{id: p, op: dp_prune, input: d, density: 0.2, lamda: 0.08, module_threshold: 5, layer_threshold: 3}"
    else:
        step = ("{id: p, op: dpa_amplify, input: d, select: dp, partitions: [{density: 0.1, scale: 1.8}, "
                "{density: 0.2, scale: 1.0}], factors: release, dense_scale: max}")
    return (f"name: scale-{method}\nsteps:\n  - {{id: base, op: load, model: {base}}}\n"
            f"  - {{id: ft, op: load, model: {ft}}}\n  - {{id: d, op: diff, model: ft, base: base}}\n"
            f"  - {step}\n  - {{id: out, op: save, input: p, path: {out}, dtype: bfloat16}}\n")


def measure(work: Path, layers: int, method: str) -> dict[str, float]:
    """One ``mergeengine run`` in a child process, measured by ``benchmarks/perf``'s harness."""
    from perf_measure import run_measured

    base, ft = write_pair(work / f"L{layers}", layers)
    out = work / f"L{layers}" / f"out-{method}"
    path = work / f"L{layers}" / f"{method}.yaml"
    path.write_text(recipe(base, ft, method, out))
    subprocess.run(["sync"], check=False)
    m = run_measured([str(REPO / ".venv" / "bin" / "mergeengine"), "run", str(path), "--overwrite", "-q"],
                     work / f"L{layers}" / f"{method}.log")
    if m.rc != 0:
        raise RuntimeError(f"mergeengine run {path} failed (exit {m.rc}); see {m.log}")
    return {"layers": layers, "method": method, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
            "max_rss_gib": m.max_rss_bytes / 2**30, "peak_anon_gib": m.peak_anon_bytes / 2**30,
            "others_cpu_cores": m.others_cpu_cores, "input_gib": _size(base) + _size(ft)}


def _size(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30


def main(argv: list[str] | None = None) -> int:
    """Command line; see ``--help``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work", type=Path, default=Path("/tmp/minipaper-scale-7b"))
    args = p.parse_args(argv)
    rows = [measure(args.work, n, m) for n in args.layers for m in ("dp", "dpa")]
    for r in rows:
        print(f"{r['layers']} layer(s) {r['method']:>3}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
              f"max RSS {r['max_rss_gib']:.2f} GiB, peak anon {r['peak_anon_gib']:.2f} GiB "
              f"(inputs {r['input_gib']:.2f} GiB; other jobs used {r['others_cpu_cores']:.1f} cores)")
    (args.work / "scale_7b.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
