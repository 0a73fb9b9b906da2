"""mergeengine against real mergekit on the configs of tests/mergekit_configs/: the max abs difference per tensor.

Builds the tiny family the tests use (``base``, ``ft_a``, ``ft_b``, ``ft_c`` of one layout, float32),
runs each config with ``mergekit-yaml`` (from a separate virtual environment holding mergekit) and
with ``mergeengine run``, and prints, per config, the largest absolute difference over every tensor
and the tensor where it occurs, then the L1 norm of each output's change from the base over every
tensor (mergeengine's over mergekit's) and the fraction of entries each changes: for the random
methods (DARE, DELLA below density 1) these agree in distribution. A config is a stem of
tests/mergekit_configs/ or a path to a .yml file. mergekit is not a dependency of mergeengine; install it apart::

    python -m venv /work/mk-venv
    /work/mk-venv/bin/pip install torch==2.13.0
    /work/mk-venv/bin/pip install torch==2.13.0 mergekit==0.1.5

Example::

    .venv/bin/python benchmarks/mergekit_parity.py --mergekit-venv /work/mk-venv --layout llama \\
        della_weighted sce_three karcher_with_base
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import read_folder  # noqa: E402
from tests.test_mergekit_configs import LAYERS, _read, _write_like, _write_tokenizer  # noqa: E402

CONFIGS = REPO / "tests" / "mergekit_configs"


def build_family(root: Path, layout: str) -> None:
    """The tests' tiny family: a random model of ``layout`` and three fine-tunes of it (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, head_dim=8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(layout, **kw)).save_pretrained(root / "base")
    base = _read(root / "base")
    g = torch.Generator().manual_seed(1)
    for name in ("ft_a", "ft_b", "ft_c"):
        _write_like(root / "base", root / name, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    for name, extra, added in (("base", [], []), ("ft_a", ["tok_a1", "tok_a2"], ["<tool>"]), ("ft_b", ["tok_b"], []),
                               ("ft_c", [], [])):
        _write_tokenizer(root / name, extra, added)


def _by_token(mk: Path, me: Path, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergeengine's vocabulary rows put in the order of mergekit's output tokenizer (the union's token
    order between models follows mergekit's set of models, so ids may differ; rows are compared by token)."""
    from transformers import AutoTokenizer

    theirs, ours = (AutoTokenizer.from_pretrained(str(f)).get_vocab() for f in (mk, me))
    if set(theirs) != set(ours):
        raise SystemExit(f"{me.name}: the output tokenizers differ: {sorted(set(theirs) ^ set(ours))}")
    out = dict(got)
    for name, t in got.items():
        if "embed_tokens" in name or "lm_head" in name:
            order = torch.arange(t.shape[0])
            for token, i in theirs.items():
                order[i] = ours[token]
            out[name] = t[order]
    return out


def compare(root: Path, config: str, mergekit_yaml: Path) -> tuple[float, str, float, float, float]:
    """(max abs difference, tensor, L1 ratio of the changes from the base, fraction changed by mergekit,
    by mergeengine) between mergekit's and mergeengine's output of one config."""
    src = Path(config) if config.endswith(".yml") else CONFIGS / f"{config}.yml"
    config = src.stem
    shutil.copy(src, root / f"{config}.yml")
    mk, me = root / f"mk_{config}", root / f"me_{config}"
    subprocess.run([str(mergekit_yaml), f"{config}.yml", str(mk), "--no-write-model-card", "--random-seed", "0"],
                   cwd=root, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    subprocess.run([sys.executable, "-m", "mergeengine", "run", f"{config}.yml", "--out", str(me)], cwd=root,
                   check=True, capture_output=True)
    want, got = read_folder(mk), read_folder(me)
    text = src.read_text()
    if "tokenizer" in text:  # a vocabulary built from the tokenizers: rows compared by token
        got = _by_token(mk, me, got)
    if set(want) != set(got):
        raise SystemExit(f"{config}: tensor names differ: {sorted(set(want) ^ set(got))}")
    worst = max(want, key=lambda n: float((want[n].double() - got[n].double()).abs().max()))
    base = {n: t for n, t in _read(root / "base").items() if n in want and t.shape == want[n].shape}
    changes = [[(out[n].double() - t.double()).abs() for n, t in base.items()] for out in (want, got)]
    l1 = [sum(float(c.sum()) for c in cs) for cs in changes]
    changed = [sum(int((c != 0).sum()) for c in cs) / sum(t.numel() for t in base.values()) for cs in changes]
    return (float((want[worst].double() - got[worst].double()).abs().max()), worst,
            l1[1] / l1[0] if l1[0] else float("nan"), changed[0], changed[1])


def main() -> None:
    """Print one line per config: its name, the max abs difference and its tensor, the change statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config stems in tests/mergekit_configs/, or .yml paths")
    parser.add_argument("--mergekit-venv", type=Path, required=True)
    parser.add_argument("--layout", default="llama")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_family(root, args.layout)
        for config in args.configs:
            diff, tensor, ratio, mk, me = compare(root, config, args.mergekit_venv / "bin" / "mergekit-yaml")
            print(f"{Path(config).stem}\tmax abs {diff:.3g} ({tensor})\tL1 of the change {ratio:.4f}x mergekit's\t"
                  f"changed {mk:.4f} (mergekit) {me:.4f}", flush=True)


if __name__ == "__main__":
    main()
