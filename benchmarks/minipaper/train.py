"""Train the miniature experiment's models on CPU: a tiny Llama base and one full fine-tune per skill.

    .venv/bin/python benchmarks/minipaper/train.py            # full run (minutes), cached
    .venv/bin/python benchmarks/minipaper/train.py --small    # seconds: the test suite's pipeline check

Every model is a Hugging Face folder (config.json, model.safetensors in float32, tokenizer files)
under ``benchmarks/minipaper/_cache/`` (git-ignored), keyed by a hash of everything that
determines it (data config, model shape, training config, code version), so a rerun with the same
settings trains nothing. ``run-<hash>/summary.json`` holds training times, the accuracy of every
model on every task and the delta statistics; ``run-<hash>/tasks.{val,test}.yaml`` are task files
for ``mergeengine eval`` whose ``reference`` is each task's dense expert accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import data as data_mod  # noqa: E402

from mergeengine.eval import evaluate, load_tasks  # noqa: E402
from mergeengine.eval.charlevel import build_char_tokenizer  # noqa: E402

LOG = logging.getLogger("minipaper.train")

#: bump when a change to this file changes what a given config trains (data.py has DATA_VERSION)
TRAIN_VERSION = 1
DEFAULT_CACHE = Path(__file__).resolve().parent / "_cache"
LINEAR_SUFFIXES = tuple(
    f"{block}.{name}.weight"
    for block, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for name in names
)


@dataclass(frozen=True)
class ModelShape:
    """Shape of the tiny ``LlamaForCausalLM`` (vocabulary: the character tokenizer's)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class BaseTraining:
    """Pretraining of the base on the text mixture (packed windows of ``block_size`` tokens)."""

    steps: int = 800
    batch_size: int = 64
    block_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0


@dataclass(frozen=True)
class ExpertTraining:
    """Full fine-tuning of the base on one skill; loss on the answer and its newline only.

    ``name`` tells apart two experts of the same task (default: the task's name).
    """

    task: str
    steps: int
    lr: float
    batch_size: int = 64
    warmup_steps: int = 20
    seed: int = 0
    name: str = ""

    @property
    def label(self) -> str:
        """The expert's name in folders, summaries and tables."""
        return self.name or self.task


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines the trained models and the evaluation sizes."""

    data: data_mod.DataConfig = field(default_factory=data_mod.DataConfig)
    shape: ModelShape = field(default_factory=ModelShape)
    base: BaseTraining = field(default_factory=BaseTraining)
    experts: tuple[ExpertTraining, ...] = (
        ExpertTraining("addition", steps=1000, lr=3e-4),
        ExpertTraining("reverse", steps=200, lr=1e-4),
        ExpertTraining("sort", steps=200, lr=1e-4),
        # pruning only (Table 1): the same skill with a 3x larger learning rate, hence a larger delta
        ExpertTraining("addition", steps=1000, lr=1e-3, name="addition-large"),
    )
    #: the experts Table 2 merges (one per task; their accuracies are the task files' references)
    merge_experts: tuple[str, ...] = ("addition", "reverse", "sort")
    eval_batch_size: int = 200

    def expert(self, label: str) -> ExpertTraining:
        """The training config of the expert called ``label``."""
        for e in self.experts:
            if e.label == label:
                return e
        raise KeyError(f"Unknown expert '{label}'. Available: {', '.join(e.label for e in self.experts)}")


def small_config() -> ExperimentConfig:
    """A micro version for the test suite: trains and evaluates in seconds."""
    return ExperimentConfig(
        data=data_mod.DataConfig(n_train=400, n_val=16, n_test=24, max_digits=2, pretrain_docs=300),
        shape=ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        base=BaseTraining(steps=20, batch_size=16, block_size=32, warmup_steps=2),
        experts=(
            ExpertTraining("addition", steps=15, lr=3e-3, batch_size=16, warmup_steps=2),
            ExpertTraining("reverse", steps=10, lr=1e-3, batch_size=16, warmup_steps=2),
            ExpertTraining("sort", steps=10, lr=1e-3, batch_size=16, warmup_steps=2),
            ExpertTraining("addition", steps=15, lr=1e-2, batch_size=16, warmup_steps=2, name="addition-large"),
        ),
        eval_batch_size=24,
    )


def config_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (dataclasses are converted)."""
    norm = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    text = json.dumps([data_mod.DATA_VERSION, TRAIN_VERSION, *norm], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Paths:
    """Where each artefact of a config lives in the cache."""

    cache: Path
    cfg: ExperimentConfig

    @property
    def data(self) -> Path:
        return self.cache / f"data-{config_hash(self.cfg.data)}"

    @property
    def base(self) -> Path:
        return self.cache / f"base-{config_hash(self.cfg.data, self.cfg.shape, self.cfg.base)}"

    def expert(self, label: str) -> Path:
        key = config_hash(self.cfg.data, self.cfg.shape, self.cfg.base, self.cfg.expert(label))
        return self.cache / f"expert-{label}-{key}"

    @property
    def run(self) -> Path:
        return self.cache / f"run-{config_hash(self.cfg)}"


# --- training ----------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_loop(
    model: torch.nn.Module,
    batches: Any,
    steps: int,
    lr: float,
    warmup: int,
    what: str,
) -> list[float]:
    """AdamW with clipping; ``batches(step)`` returns (input_ids, labels, attention_mask)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        input_ids, labels, mask = batches(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
            recent = losses[-max(1, steps // 10) :]
            LOG.info(
                "%s step %d/%d loss %.4f (%.1fs)",
                what,
                step + 1,
                steps,
                sum(recent) / len(recent),
                time.perf_counter() - t0,
            )
    model.eval()
    return losses


def _save_atomically(model: Any, tokenizer: Any, folder: Path, log: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def train_base(cfg: ExperimentConfig, paths: Paths) -> Path:
    """Pretrain the base on the text mixture (cached). Returns its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = paths.base
    if (folder / "model.safetensors").is_file():
        LOG.info("base: cached at %s", folder)
        return folder
    tokenizer = build_char_tokenizer()
    docs = (paths.data / "pretrain.txt").read_text(encoding="utf-8").splitlines()
    ids: list[int] = []
    for doc in docs:  # every document starts with <bos> like every prompt does
        ids.extend(tokenizer(doc + "\n")["input_ids"])
    stream = torch.tensor(ids, dtype=torch.long)
    shape, tc = cfg.shape, cfg.base
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(tc.seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(tc.seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(stream) - tc.block_size, (tc.batch_size,), generator=gen)
        x = torch.stack([stream[s : s + tc.block_size] for s in starts.tolist()])
        return x, x, torch.ones_like(x)

    t0 = time.perf_counter()
    losses = _train_loop(model, batches, tc.steps, tc.lr, tc.warmup_steps, "base")
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    _save_atomically(
        model,
        tokenizer,
        folder,
        {
            "seconds": seconds,
            "losses": losses,
            "params": n_params,
            "stream_tokens": len(stream),
            "config": asdict(tc),
        },
    )
    LOG.info("base: %d parameters, trained in %.1fs", n_params, seconds)
    return folder


def _expert_batches(tokenizer: Any, records: list[dict], tc: ExpertTraining) -> Any:
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    encoded = []
    for r in records:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + newline
        encoded.append((p, a))
    return answer_batches(encoded, tc, tokenizer.pad_token_id)


def answer_batches(encoded: list[tuple[list[int], list[int]]], tc: ExpertTraining, pad: int) -> Any:
    """``batches(step)`` -> (input_ids, labels, attention_mask) of random (prompt, answer) pairs,
    padded to the longest; only the answer tokens are labelled."""
    rng = random.Random(tc.seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(tc.batch_size)]
        width = max(len(p) + len(a) for p, a in chosen)
        x = torch.full((tc.batch_size, width), pad, dtype=torch.long)
        y = torch.full((tc.batch_size, width), -100, dtype=torch.long)
        m = torch.zeros((tc.batch_size, width), dtype=torch.long)
        for i, (p, a) in enumerate(chosen):
            n = len(p) + len(a)
            x[i, :n] = torch.tensor(p + a)
            y[i, len(p) : n] = torch.tensor(a)
            m[i, :n] = 1
        return x, y, m

    return batches


def train_expert(cfg: ExperimentConfig, paths: Paths, label: str) -> Path:
    """Fully fine-tune the base into expert ``label`` (cached). Returns the expert's folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = paths.expert(label)
    if (folder / "model.safetensors").is_file():
        LOG.info("expert %s: cached at %s", label, folder)
        return folder
    tc = cfg.expert(label)
    tokenizer = AutoTokenizer.from_pretrained(paths.base)
    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    records = data_mod.read_jsonl(paths.data / tc.task / "train.jsonl")
    torch.manual_seed(tc.seed)
    t0 = time.perf_counter()
    losses = _train_loop(
        model, _expert_batches(tokenizer, records, tc), tc.steps, tc.lr, tc.warmup_steps, f"expert {label}"
    )
    seconds = time.perf_counter() - t0
    _save_atomically(model, tokenizer, folder, {"seconds": seconds, "losses": losses, "config": asdict(tc)})
    LOG.info("expert %s: trained in %.1fs", label, seconds)
    return folder


# --- statistics and evaluation ----------------------------------------------------------------------


def delta_stats(base_dir: Path, expert_dir: Path) -> dict[str, float]:
    """Mean and max |expert - base| over the decoder linear weights (what DP prunes) and overall."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    expert = load_file(str(expert_dir / "model.safetensors"))
    lin_abs, lin_n, all_abs, all_n, lin_max, lin_sq, base_sq = 0.0, 0, 0.0, 0, 0.0, 0.0, 0.0
    for name, b in base.items():
        d = (expert[name].float() - b.float()).abs()
        all_abs += float(d.sum())
        all_n += d.numel()
        if name.endswith(LINEAR_SUFFIXES):
            lin_abs += float(d.sum())
            lin_n += d.numel()
            lin_max = max(lin_max, float(d.max()))
            lin_sq += float((d * d).sum())
            base_sq += float((b.float() ** 2).sum())
    return {
        "mean_abs_delta_linear": lin_abs / max(1, lin_n),
        "max_abs_delta_linear": lin_max,
        "relative_norm_linear": math.sqrt(lin_sq / max(base_sq, 1e-30)),
        "mean_abs_delta_all": all_abs / max(1, all_n),
    }


def evaluate_models(cfg: ExperimentConfig, paths: Paths, split: str) -> dict[str, dict[str, float]]:
    """Accuracy of the base and every expert on every task of ``split``: {model: {task: accuracy}}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = load_tasks(paths.data / f"tasks.{split}.yaml")
    table: dict[str, dict[str, float]] = {}
    for name, folder in [("base", paths.base)] + [(e.label, paths.expert(e.label)) for e in cfg.experts]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        result = evaluate(model, tokenizer, tasks, batch_size=cfg.eval_batch_size)
        table[name] = {t.name: t.accuracy for t in result.tasks}
        table[name].update({f"{t.name}:loglik": t.mean_loglik for t in result.tasks})
        LOG.info(
            "%s on %s: %s (%.1fs)",
            name,
            split,
            ", ".join(f"{t.name} {t.accuracy:.3f}" for t in result.tasks),
            result.seconds,
        )
    return table


def write_reference_task_files(cfg: ExperimentConfig, paths: Paths, accuracies: dict[str, dict]) -> None:
    """``run/tasks.{split}.yaml``: each task's reference is its merge expert's accuracy on that split."""
    paths.run.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(paths.data, paths.run)
    for split in ("val", "test"):
        refs = {e.task: max(accuracies[split][e.label][e.task], 1e-6)
                for e in map(cfg.expert, cfg.merge_experts)}
        doc = data_mod.task_file_entries(split, cfg.data, refs)
        for entry in doc["tasks"]:
            entry["path"] = f"{rel}/{entry['path']}"
        import yaml

        (paths.run / f"tasks.{split}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def run(cfg: ExperimentConfig, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Generate data, train base and experts, evaluate them; everything cached. Returns the summary."""
    paths = Paths(cache, cfg)
    summary_path = paths.run / "summary.json"
    if summary_path.is_file():
        LOG.info("summary cached at %s", summary_path)
        return json.loads(summary_path.read_text())
    if not (paths.data / "config.json").is_file():
        tmp = paths.data.with_name(paths.data.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        data_mod.write_dataset(tmp, cfg.data)
        os.replace(tmp, paths.data)
    train_base(cfg, paths)
    for e in cfg.experts:
        train_expert(cfg, paths, e.label)
    t0 = time.perf_counter()
    accuracies = {split: evaluate_models(cfg, paths, split) for split in ("val", "test")}
    eval_seconds = time.perf_counter() - t0
    write_reference_task_files(cfg, paths, accuracies)

    def log_of(folder: Path) -> dict:
        return json.loads((folder / "train_log.json").read_text())

    summary = {
        "config": asdict(cfg),
        "paths": {
            "data": str(paths.data),
            "base": str(paths.base),
            "experts": {e.label: str(paths.expert(e.label)) for e in cfg.experts},
            "tasks_val": str(paths.run / "tasks.val.yaml"),
            "tasks_test": str(paths.run / "tasks.test.yaml"),
        },
        "params": log_of(paths.base)["params"],
        "train_seconds": {"base": log_of(paths.base)["seconds"]}
        | {e.label: log_of(paths.expert(e.label))["seconds"] for e in cfg.experts},
        "eval_seconds": eval_seconds,
        "accuracy": accuracies,
        "delta": {e.label: delta_stats(paths.base, paths.expert(e.label)) for e in cfg.experts},
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return json.loads(summary_path.read_text())  # the same types as a cached run's (lists, not tuples)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable training report: times, test accuracy matrix, delta sizes."""
    tasks = list(dict.fromkeys(e["task"] for e in summary["config"]["experts"]))
    lines = [
        f"parameters: {summary['params']:,}",
        "train seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["train_seconds"].items()),
        f"eval seconds (all models, val+test): {summary['eval_seconds']:.1f}",
        "test accuracy (rows: model, columns: task):",
        f"{'model':<15}" + "".join(f"{t:>10}" for t in tasks),
    ]
    for model, accs in summary["accuracy"]["test"].items():
        lines.append(f"{model:<15}" + "".join(f"{accs[t]:10.3f}" for t in tasks))
    lines.append("delta per expert: mean|D| linear, max|D| linear, ||D||/||B|| linear, mean|D| all")
    for t, d in summary["delta"].items():
        lines.append(
            f"{t:<15}{d['mean_abs_delta_linear']:12.6f}{d['max_abs_delta_linear']:10.4f}"
            f"{d['relative_norm_linear']:10.4f}{d['mean_abs_delta_all']:12.6f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``train.py [--small] [--threads N] [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="micro models, seconds (test suite)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("mergeengine").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = small_config() if args.small else ExperimentConfig()
    summary = run(cfg, args.cache_dir)
    print(format_summary(summary))
    return 0


__all__ = [
    "ExperimentConfig",
    "ExpertTraining",
    "BaseTraining",
    "ModelShape",
    "run",
    "small_config",
]

if __name__ == "__main__":
    raise SystemExit(main())
