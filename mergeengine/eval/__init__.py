"""Evaluation of merged models: task files, greedy exact match, answer log-likelihood.

Needs the optional extra ``pip install 'mergeengine[eval]'`` (transformers), imported only when a
model is evaluated, so ``import mergeengine.eval`` works without it.

Example:
    >>> from mergeengine.eval import evaluate, format_table  # doctest: +SKIP
    >>> print(format_table(evaluate("out/merged", None, "tasks.yaml")))  # doctest: +SKIP
"""

from mergeengine.eval.evaluate import (
    EvalResult,
    SampleResult,
    TaskResult,
    evaluate,
    format_table,
    load_model,
    require_transformers,
    to_json,
)
from mergeengine.eval.tasks import (
    TaskFile,
    TaskFileError,
    TaskSpec,
    extract_answer,
    load_records,
    load_tasks,
    parse_tasks,
)

__all__ = [
    "EvalResult",
    "SampleResult",
    "TaskFile",
    "TaskFileError",
    "TaskResult",
    "TaskSpec",
    "evaluate",
    "extract_answer",
    "format_table",
    "load_model",
    "load_records",
    "load_tasks",
    "parse_tasks",
    "require_transformers",
    "to_json",
]
