"""Synthetic data of the miniature DPPA experiment: a pretraining text mixture and three skills.

Skills (one fully fine-tuned expert each), prompt -> answer, answers end with a newline in training:

* ``addition``: ``"123+45="`` -> ``"168"``; operands of 1 to ``max_digits`` digits. Carries make it
  the hard skill: its expert is trained longest, with the largest learning rate, and has the
  largest delta (the paper's "complex" fine-tune).
* ``reverse``: ``"reverse: abcde -> "`` -> ``"edcba"``.
* ``sort``: ``"sort: dbca -> "`` -> ``"abcd"``.

The base sees reverse and sort during pretraining, in prose and in their task format (see
:func:`pretrain_documents`), so those experts are small fine-tunes; addition is new to it.

Everything is generated from a seed with :class:`random.Random`, so the same config always gives
the same files. Splits never share a prompt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

#: bump when a change here changes the generated data (it is part of every cache key)
DATA_VERSION = 3
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = ("addition", "reverse", "sort")


@dataclass(frozen=True)
class DataConfig:
    """Sizes and difficulty of the generated data.

    Attributes:
        seed: seed of every generator.
        n_train: training records per task.
        n_val: validation records per task (the DPA factor search evaluates on these).
        n_test: test records per task (the tables report these).
        max_digits: largest operand length of ``addition``.
        min_letters: shortest string of ``reverse`` / ``sort``.
        max_letters: longest string of ``reverse`` / ``sort``.
        pretrain_docs: documents in the pretraining text mixture.
        format_fraction: share of the pretraining's reverse / sort sentences written in the task's
            own format (``"reverse: abc -> cba"``) rather than in prose.
    """

    seed: int = 1234
    n_train: int = 20000
    n_val: int = 200
    n_test: int = 400
    max_digits: int = 3
    min_letters: int = 3
    max_letters: int = 7
    pretrain_docs: int = 40000
    format_fraction: float = 0.5

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (hashed into cache keys)."""
        return asdict(self)


def addition_example(rng: random.Random, cfg: DataConfig) -> tuple[str, str]:
    """``"a+b="`` -> ``"a+b"``, each operand with a uniformly drawn number of digits."""
    a, b = (rng.randint(0, 10 ** rng.randint(1, cfg.max_digits) - 1) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def _letters(rng: random.Random, cfg: DataConfig) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(cfg.min_letters, cfg.max_letters)))


def reverse_example(rng: random.Random, cfg: DataConfig) -> tuple[str, str]:
    """``"reverse: abc -> "`` -> ``"cba"``."""
    s = _letters(rng, cfg)
    return f"reverse: {s} -> ", s[::-1]


def sort_example(rng: random.Random, cfg: DataConfig) -> tuple[str, str]:
    """``"sort: cab -> "`` -> ``"abc"``."""
    s = _letters(rng, cfg)
    return f"sort: {s} -> ", "".join(sorted(s))


GENERATORS: dict[str, Callable[[random.Random, DataConfig], tuple[str, str]]] = {
    "addition": addition_example,
    "reverse": reverse_example,
    "sort": sort_example,
}


# max_new_tokens per task: the longest answer plus the newline that stops generation.
def max_answer_chars(task: str, cfg: DataConfig) -> int:
    """Upper bound on the answer length of ``task`` in characters."""
    if task == "addition":
        return cfg.max_digits + 1
    return cfg.max_letters


def make_splits(task: str, cfg: DataConfig) -> dict[str, list[dict[str, str]]]:
    """Train/val/test records of one task, with no prompt shared between splits.

    Test and validation are drawn first, so they do not change when ``n_train`` changes.
    """
    rng = random.Random(f"{cfg.seed}-{task}")
    gen = GENERATORS[task]
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, n in (("test", cfg.n_test), ("val", cfg.n_val), ("train", cfg.n_train)):
        records: list[dict[str, str]] = []
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {task} prompts for {split}: make the task larger")
            prompt, answer = gen(rng, cfg)
            # the training split may repeat prompts (it is sampled), evaluation splits may not
            if prompt in seen:
                continue
            if split != "train":
                seen.add(prompt)
            records.append({"prompt": prompt, "answer": answer})
        splits[split] = records
    return splits


# --- pretraining mixture ---------------------------------------------------------------------

_NOUNS = (
    "cat dog bird fish tree house river book car apple sun moon child teacher farmer road box cup".split()
)
_ADJS = "big small red green old young happy quiet fast slow warm cold bright dark".split()
_VERBS = "sees likes finds takes moves holds follows paints counts opens".split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _sentence(rng: random.Random, cfg: DataConfig, held_out: set[str]) -> str:
    kind = rng.randrange(10)
    if kind in (8, 9):  # the reverse / sort skills, never on a validation or test string
        s = _letters(rng, cfg)
        while s in held_out:
            s = _letters(rng, cfg)
        in_format = rng.random() < cfg.format_fraction
        if kind == 8:
            return f"reverse: {s} -> {s[::-1]}" if in_format else f"the reverse of {s} is {s[::-1]}."
        return f"sort: {s} -> {''.join(sorted(s))}" if in_format else f"{s} in order is {''.join(sorted(s))}."
    n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
    a1, a2 = rng.choice(_ADJS), rng.choice(_ADJS)
    if kind == 0:
        return f"the {a1} {n1} {rng.choice(_VERBS)} the {a2} {n2}."
    if kind == 1:
        return f"a {n1} is {a1}, and the {n2} is {a2}."
    if kind == 2:
        start = rng.randint(0, 990)
        return " ".join(str(i) for i in range(start, start + rng.randint(3, 8)))
    if kind == 3:
        i = rng.randint(0, 20)
        return LETTERS[i : i + rng.randint(3, 6)]
    if kind == 4:
        word = rng.choice(_NOUNS)
        return f"{word} is spelled {' '.join(word)}."
    if kind == 5:
        x, y = rng.randint(0, 5), rng.randint(0, 5)
        return f"{_NUMBER_WORDS[x]} and {_NUMBER_WORDS[y]} make {_NUMBER_WORDS[x + y]}."
    if kind == 6:
        return f"there are {rng.randint(2, 999)} {n1}s near the {n2}."
    return f"is the {n1} {a1}? yes! the {n1} is {a1}; not {a2}."


def held_out_strings(cfg: DataConfig) -> set[str]:
    """The letter strings of every reverse / sort validation and test prompt."""
    small = replace(cfg, n_train=0)
    return {
        r["prompt"].split(": ", 1)[1].removesuffix(" -> ")
        for task in ("reverse", "sort")
        for split, records in make_splits(task, small).items()
        if split != "train"
        for r in records
    }


def pretrain_documents(cfg: DataConfig) -> list[str]:
    """The base model's training text: short documents of 1 to 4 simple sentences each.

    Templated sentences, counting, letter runs, one-digit sums in words, and the reverse and
    sort skills, in prose ("the reverse of abc is cba.") or, for ``format_fraction`` of them, in
    the task format ("reverse: abc -> cba"); never on a string of a validation or test prompt.
    Like an LLM that can already do a task in some form, the base makes the reverse and sort
    fine-tunes small. Multi-digit addition is absent, so its expert has to learn a new skill:
    the large-delta fine-tune.
    """
    rng = random.Random(f"{cfg.seed}-pretrain")
    held_out = held_out_strings(cfg)
    return [
        " ".join(_sentence(rng, cfg, held_out) for _ in range(rng.randint(1, 4))) for _ in range(cfg.pretrain_docs)
    ]


# --- files ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    """Read one JSON object per line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def task_file_entries(
    split: str, cfg: DataConfig, references: dict[str, float] | None = None, tasks: tuple[str, ...] = TASKS
) -> dict:
    """The ``mergeengine eval`` task file for one split (paths relative to the data folder).

    Args:
        split: ``"val"`` or ``"test"``.
        cfg: the data config (answer lengths).
        references: accuracy of each task's dense expert, written as ``reference``.
        tasks: which tasks to list.
    """
    entries = []
    for task in tasks:
        entry: dict = {
            "name": task,
            "path": f"{task}/{split}.jsonl",
            "extract": {"type": "full"},
            "stop": ["\n"],
            "max_new_tokens": max_answer_chars(task, cfg) + 1,
        }
        if references and task in references:
            entry["reference"] = round(float(references[task]), 6)
        entries.append(entry)
    return {"tasks": entries}


def write_task_file(
    path: Path,
    split: str,
    cfg: DataConfig,
    references: dict[str, float] | None = None,
    tasks: tuple[str, ...] = TASKS,
) -> Path:
    """Write :func:`task_file_entries` as YAML to ``path`` (inside the data folder)."""
    path.write_text(
        yaml.safe_dump(task_file_entries(split, cfg, references, tasks), sort_keys=False), encoding="utf-8"
    )
    return path


def write_dataset(folder: Path, cfg: DataConfig) -> Path:
    """Generate every split of every task plus the pretraining text into ``folder``.

    Layout: ``{task}/{train,val,test}.jsonl``, ``pretrain.txt`` (one document a line),
    ``tasks.val.yaml`` and ``tasks.test.yaml`` (no references yet), ``config.json``.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for split, records in make_splits(task, cfg).items():
            write_jsonl(folder / task / f"{split}.jsonl", records)
    (folder / "pretrain.txt").write_text("\n".join(pretrain_documents(cfg)) + "\n", encoding="utf-8")
    for split in ("val", "test"):
        write_task_file(folder / f"tasks.{split}.yaml", split, cfg)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    return folder
