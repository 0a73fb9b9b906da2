"""lm-evaluation-harness tasks as a search objective (the optional extra ``mergeengine[lmeval]``).

The in-memory model and tokenizer are wrapped once in lm-eval's ``HFLM``; the tasks are loaded
once through a ``TaskManager`` (only the ``include_path`` folder is indexed when every task is
found there, which takes milliseconds instead of indexing lm-eval's thousands of built-in tasks),
and each call runs ``lm_eval.evaluator.evaluate`` on them. A local task YAML over local JSONL data
works offline::

    task: tiny_add
    dataset_path: json
    dataset_kwargs: {data_files: {validation: data/add.jsonl}}   # relative to the task folder
    validation_split: validation
    output_type: multiple_choice
    doc_to_text: "{{prompt}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

Each task's score is its ``metric`` (default: the first metric it reports), unnormalised; the
search divides it by the dense expert's score.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mergeengine.errors import MergeEngineError
from mergeengine.recipe.schema import LmEvalTasks

INSTALL_HINT = "lm-eval tasks need lm-evaluation-harness: pip install 'mergeengine[lmeval]'"
FEWSHOT_SEED = 1234  # lm-eval's own default


def require_lm_eval() -> Any:
    """Import and return ``lm_eval``.

    Raises:
        MergeEngineError: lm-eval is not installed (the message says how to install it).
    """
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError:
        raise MergeEngineError(INSTALL_HINT) from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


@contextlib.contextmanager
def _in_folder(folder: Path | None) -> Iterator[None]:
    """Relative ``data_files`` of local task YAMLs resolve against their folder while tasks load."""
    if folder is None:
        yield
        return
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def load_task_dict(names: Sequence[str], include_path: Path | None) -> dict[str, Any]:
    """lm-eval's task dict for ``names`` (local tasks in ``include_path``, else lm-eval's own).

    Raises:
        MergeEngineError: a task is unknown (the message lists what the folder has).
    """
    lm_eval = require_lm_eval()
    manager_cls = lm_eval.tasks.TaskManager
    manager = None
    if include_path is not None:
        if not include_path.is_dir():
            raise MergeEngineError("lm-eval include_path is not a folder", file=str(include_path))
        local = manager_cls(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            manager = local
    if manager is None:
        manager = manager_cls(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise MergeEngineError(f"unknown lm-eval task(s) {', '.join(unknown)}" +
                               (f" (not in {include_path} nor lm-eval's tasks)" if include_path else ""))
    with _in_folder(include_path), contextlib.redirect_stderr(io.StringIO()):
        return manager.load(list(names))


def task_score(results: dict[str, Any], metric: str | None) -> float:
    """One task's score from lm-eval's results: ``metric`` (any filter), else the first metric reported.

    Raises:
        MergeEngineError: the metric is not among the task's results.
    """
    keys = [k for k in results if "," in k and "_stderr" not in k and isinstance(results[k], int | float)]
    if metric is not None:
        keys = [k for k in keys if k.split(",", 1)[0] == metric]
    if not keys:
        have = sorted({k.split(",", 1)[0] for k in results if "," in k and "_stderr" not in k})
        raise MergeEngineError(f"lm-eval task '{results.get('alias', '?')}' reports no metric "
                               f"'{metric}'; it has {', '.join(have) or 'none'}")
    return float(results[keys[0]])


class LmEvalScorer:
    """``(model, tokenizer) -> {task: score}`` on lm-eval tasks, for the search."""

    def __init__(self, tasks: LmEvalTasks, base_dir: Path, *, batch_size: int, limit: int | None) -> None:
        self.spec = tasks
        self.lm_eval = require_lm_eval()
        include = None
        if tasks.include_path is not None:
            include = Path(tasks.include_path)
            include = include if include.is_absolute() else (base_dir / include).resolve()
        self.task_dict = load_task_dict(tasks.lm_eval, include)
        for task in self.task_dict["tasks"].values():
            if tasks.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=tasks.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        self.batch_size = batch_size
        self.limit = limit
        self.lm: Any = None
        self.model: Any = None

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Evaluate ``model`` (weights already loaded) on every task."""
        if self.lm is None or self.model is not model:
            hf = self.lm_eval.models.huggingface.HFLM
            with contextlib.redirect_stderr(io.StringIO()):
                self.lm = hf(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                             device=str(next(model.parameters()).device))
            self.model = model
        with contextlib.redirect_stderr(io.StringIO()):
            out = self.lm_eval.evaluator.evaluate(self.lm, self.task_dict, limit=self.limit, log_samples=False,
                                                  bootstrap_iters=0, verbosity="ERROR")
        results = out["results"]
        return {name: task_score(results[name], self.spec.metric) for name in self.task_dict["tasks"]}
