"""Task files: which prompts to evaluate a model on and how to read its answers.

A task file is YAML; each task points at a JSONL file of ``{"prompt": ..., "answer": ...}`` records
(path relative to the YAML file) and says how to extract the answer from a greedy generation::

    tasks:
      - name: addition
        path: data/addition/test.jsonl
        extract: {type: full}          # generation up to the first stop string, stripped
        stop: ["\\n"]                  # default
        max_new_tokens: 8
        limit: 200                     # optional: first 200 records only
        reference: 0.97                # optional: accuracy of the dense fine-tuned model
      - name: gsm8k
        path: gsm8k/test.jsonl
        extract: {type: after, marker: "####"}
        stop: ["\\n\\n"]
        max_new_tokens: 256
      - name: letters
        path: letters.jsonl
        extract: {type: regex, pattern: "answer is ([a-z]+)"}
        max_new_tokens: 16

Scoring: a record is right when the extracted prediction equals its target exactly (both stripped).
``scoring: teacher_forced`` (with ``extract: full``) scores a task in one forward pass per batch
instead of generating: a record is right when, at every position of ``answer`` followed by the
first stop string, the model's most likely next token is that token, which is the verdict greedy
generation reaches whenever the answer is tokenized as the model would generate it.
The target is the record's optional ``target`` field; without one it is the same extraction rule
applied to ``answer`` (falling back to the stripped ``answer`` when the rule finds nothing), so a
GSM8K-style answer ``"...reasoning... #### 72"`` is scored against ``72``. The log-likelihood is that
of ``answer`` exactly as written, as the continuation of ``prompt``.

``reference`` feeds the relative score of :class:`mergeengine.eval.evaluate.EvalResult` (accuracy
divided by the reference, geometric mean over tasks), the objective of the DPA factor search.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeengine.errors import MergeEngineError


class TaskFileError(MergeEngineError):
    """A task file or one of its JSONL data files is invalid or missing."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AfterExtract(_Strict):
    """The text after the first occurrence of ``marker``, stripped (``None`` without a marker)."""

    type: Literal["after"]
    marker: str = Field(min_length=1)


class RegexExtract(_Strict):
    """The first match of ``pattern`` (``re.search``); ``group`` defaults to 1 if the pattern has a group."""

    type: Literal["regex"]
    pattern: str
    group: int | str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return pattern


class FullExtract(_Strict):
    """The whole generation (already cut at the first stop string), stripped."""

    type: Literal["full"]


ExtractRule = Annotated[AfterExtract | RegexExtract | FullExtract, Field(discriminator="type")]


class TaskSpec(_Strict):
    """One task of a task file. ``path`` is absolute once loaded by :func:`load_tasks`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    path: Path
    extract: ExtractRule = FullExtract(type="full")
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    max_new_tokens: int = Field(ge=1)
    limit: int | None = Field(default=None, ge=1)
    reference: float | None = Field(default=None, gt=0)
    scoring: Literal["generate", "teacher_forced"] = "generate"

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _teacher_forced_scores_the_whole_answer(self) -> TaskSpec:
        if self.scoring == "teacher_forced" and not isinstance(self.extract, FullExtract):
            raise ValueError(f"task '{self.name}': scoring: teacher_forced needs extract: {{type: full}}")
        return self


class TaskFile(_Strict):
    """A validated task file: a non-empty list of tasks with unique names."""

    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> TaskFile:
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"duplicate task name '{task.name}'")
            seen.add(task.name)
        return self


class Record(_Strict):
    """One JSONL line: a prompt, the reference answer (a continuation), and an optional target."""

    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    target: str | None = None


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def parse_tasks(data: object, base_dir: str | Path = ".", *, source: str = "<tasks>") -> TaskFile:
    """Validate an already-parsed task file and resolve its data paths against ``base_dir``.

    Args:
        data: the YAML document as Python objects (a mapping with a ``tasks`` list).
        base_dir: the folder relative data paths are resolved against.
        source: name used in error messages.

    Returns:
        The validated :class:`TaskFile` with absolute data paths.

    Raises:
        TaskFileError: the document does not match the schema.
    """
    try:
        task_file = TaskFile.model_validate(data)
    except ValidationError as exc:
        raise TaskFileError(_format_validation_error(exc), file=source) from None
    base = Path(base_dir)
    resolved = [t.model_copy(update={"path": (base / t.path).resolve()}) for t in task_file.tasks]
    return TaskFile(tasks=resolved)


def load_tasks(path: str | Path) -> TaskFile:
    """Load and validate a task file; data paths are resolved relative to the file's folder.

    Args:
        path: the YAML task file.

    Returns:
        The validated :class:`TaskFile`. The JSONL files are checked to exist, not yet read.

    Raises:
        TaskFileError: the file is missing, is not valid YAML, breaks the schema, or names a
            JSONL file that does not exist.

    Example:
        >>> tasks = load_tasks("benchmarks/minipaper/_cache/data-1234/tasks.test.yaml")  # doctest: +SKIP
        >>> [t.name for t in tasks.tasks]  # doctest: +SKIP
        ['addition', 'reverse', 'sort']
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError("task file not found", file=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskFileError(f"not valid YAML: {exc}".replace("\n", " "), file=str(path)) from None
    task_file = parse_tasks(data, path.parent, source=str(path))
    for task in task_file.tasks:
        if not task.path.is_file():
            raise TaskFileError(
                f"task '{task.name}': data file {task.path} not found (paths are relative to the task file)",
                file=str(path),
            )
    return task_file


def load_records(task: TaskSpec) -> list[Record]:
    """Read a task's JSONL records (the first ``task.limit`` of them when a limit is set).

    Raises:
        TaskFileError: a line is not JSON or lacks ``prompt`` / ``answer``; the file is empty.
    """
    records: list[Record] = []
    try:
        lines = task.path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TaskFileError(f"cannot read data of task '{task.name}': {exc}", file=str(task.path)) from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if task.limit is not None and len(records) >= task.limit:
            break
        try:
            records.append(Record.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"line {lineno}: not valid JSON ({exc.msg})", file=str(task.path)) from None
        except ValidationError as exc:
            raise TaskFileError(
                f"line {lineno}: {_format_validation_error(exc)}", file=str(task.path)
            ) from None
    if not records:
        raise TaskFileError(f"task '{task.name}' has no records", file=str(task.path))
    return records


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]


def extract_answer(rule: AfterExtract | RegexExtract | FullExtract, text: str) -> str | None:
    """Apply an extraction rule to a (stop-cut) generation.

    Returns:
        The extracted, stripped answer, or ``None`` when the rule finds nothing (counted wrong).

    Example:
        >>> extract_answer(AfterExtract(type="after", marker="####"), "so 3 apples #### 3 ")
        '3'
        >>> extract_answer(RegexExtract(type="regex", pattern=r"is (\\d+)"), "the answer is 42.")
        '42'
    """
    if isinstance(rule, FullExtract):
        return text.strip()
    if isinstance(rule, AfterExtract):
        i = text.find(rule.marker)
        return None if i == -1 else text[i + len(rule.marker) :].strip()
    compiled = re.compile(rule.pattern)
    match = compiled.search(text)
    if match is None:
        return None
    group = rule.group if rule.group is not None else (1 if compiled.groups else 0)
    value = match.group(group)
    return None if value is None else value.strip()


def target_of(record: Record, task: TaskSpec) -> str:
    """The exact-match target of a record: ``target``, else the rule applied to ``answer``."""
    if record.target is not None:
        return record.target.strip()
    extracted = extract_answer(task.extract, record.answer)
    return extracted if extracted is not None else record.answer.strip()
