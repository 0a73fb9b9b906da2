"""One trial, wherever it runs (this process, a pool worker, a Ray task): build, evaluate, return scalars.

A :class:`TrialJob` carries the candidate recipe as YAML text, so it pickles small and needs
nothing from the driver. Each worker process keeps one :class:`CandidateEvaluator` per search (the
model skeleton, tokenizer and tasks are set up once, then each candidate's tensors are loaded into
it). A candidate is built in memory when it fits, otherwise into a scratch folder of its own that
is removed before the trial returns.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeengine.errors import MergeEngineError
from mergeengine.recipe.loader import LoadedRecipe, parse_recipe
from mergeengine.recipe.schema import SearchSpec


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial.

    Attributes:
        index: the trial's number in the search (0-based).
        params: the point of the space (for the record).
        recipe_text: the candidate recipe (values written in, no search block) as YAML.
        recipe_path: the original recipe's path (relative model paths resolve against its folder).
        spec: the search block (tasks, target, limits) as JSON.
        device: where to build and evaluate (``cuda`` picks the GPU Ray or the pool assigned).
    """

    index: int
    params: dict[str, float]
    recipe_text: str
    recipe_path: str
    spec: str
    device: str = "cpu"


@dataclass(frozen=True)
class TrialOutcome:
    """What comes back: scalars only."""

    index: int
    params: dict[str, float]
    task_scores: dict[str, float]
    wall_s: float
    worker: str


_EVALUATORS: dict[tuple[str, ...], CandidateEvaluator] = {}
#: the GPU a pool worker was given (``cuda:k``); ``None``: the job's device
WORKER_DEVICE: str | None = None


def run_trial(job: TrialJob) -> TrialOutcome:
    """Build and score one candidate (the entry point of every executor)."""
    t0 = time.perf_counter()
    device = WORKER_DEVICE or job.device
    spec = SearchSpec.model_validate_json(job.spec)
    candidate = parse_recipe(job.recipe_text, job.recipe_path)
    key = _evaluator_key(job, spec, candidate, device)
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        _EVALUATORS.clear()  # one evaluator per worker: free the previous model
        evaluator = _EVALUATORS[key] = CandidateEvaluator(spec, Path(job.recipe_path).resolve().parent, device)
    scores = evaluator(candidate)
    return TrialOutcome(job.index, job.params, scores, round(time.perf_counter() - t0, 4),
                        f"{socket.gethostname()}:{os.getpid()}")


def _evaluator_key(job: TrialJob, spec: SearchSpec, candidate: LoadedRecipe, device: str) -> tuple[str, ...]:
    """What a worker's evaluator depends on: the tasks and how they are run, the input models, the device.

    Not the strategy, space or budget, so searches in a row over the same models and tasks (on
    warm Ray workers, or a reused pool) set up once.
    """
    fields = spec.model_dump_json(include={"tasks", "target", "limit", "in_memory", "batch_size"})
    models = json.dumps(sorted(str(getattr(s, "model", "")) for s in candidate.recipe.steps if s.op == "load"))
    return (str(Path(job.recipe_path).resolve().parent), fields, models, device)


class CandidateEvaluator:
    """Builds a candidate recipe's target and scores it; one transformers model reused throughout."""

    def __init__(self, spec: SearchSpec, base_dir: Path, device: str) -> None:
        from mergeengine.eval.evaluate import require_transformers

        self.transformers = require_transformers()
        self.spec = spec
        self.base_dir = base_dir
        self.device = device
        self.tasks = task_scorer(spec, base_dir)
        self.model: Any = None
        self.tokenizer: Any = None
        self.in_memory = spec.in_memory != "never"

    def target_of(self, candidate: LoadedRecipe) -> str:
        """The save step evaluated: the search's ``target``, else the only save step."""
        return self.spec.target or next(s.id for s in candidate.recipe.steps if s.op == "save")

    def _prepare(self, candidate: LoadedRecipe) -> None:
        """Config and tokenizer of the target, in a scratch folder; an empty model to load tensors into."""
        from mergeengine.api import output_config, plan_recipe

        target = self.target_of(candidate)
        with tempfile.TemporaryDirectory(prefix="mergeengine-search-") as tmp:
            plan = plan_recipe(candidate, out=Path(tmp) / "plan-only")
            cfg = output_config(plan, target) or {}
            cfg["torch_dtype"] = "float32"
            (Path(tmp) / "config.json").write_text(json.dumps(cfg))
            origin = plan.steps.kinds[target].origin
            tok_from = plan.ops[target].step.tokenizer_from or origin  # type: ignore[attr-defined]
            plan.checkpoints[tok_from].write_support_files(Path(tmp))
            self.tokenizer = self.transformers.AutoTokenizer.from_pretrained(tmp)
            config = self.transformers.AutoConfig.from_pretrained(tmp)
            for c in plan.checkpoints.values():
                c.close()
        self.model = self.transformers.AutoModelForCausalLM.from_config(config).to(self.device).eval()
        fit = plan.estimate.bytes_written * 2  # float32 copy in the model
        self.in_memory = self.spec.in_memory == "always" or (self.spec.in_memory == "auto" and fit < _free_ram() / 3)

    def __call__(self, candidate: LoadedRecipe) -> dict[str, float]:
        """Build ``candidate``'s target, load it into the model, and return each task's score."""
        if self.model is None:
            self._prepare(candidate)
        if self.in_memory:
            from mergeengine.api import build_in_memory

            tensors = build_in_memory(candidate, self.target_of(candidate), device=self.device)
            self._load(tensors)
        else:
            self._build_on_disk(candidate)
        return self.tasks(self.model, self.tokenizer)

    def _build_on_disk(self, candidate: LoadedRecipe) -> None:
        from mergeengine.api import run_recipe
        from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

        if sum(s.op == "save" for s in candidate.recipe.steps) != 1:
            raise MergeEngineError("search: building on disk needs a recipe with one save step")
        with tempfile.TemporaryDirectory(prefix="mergeengine-trial-") as tmp:
            out = Path(tmp) / "candidate"
            run_recipe(candidate, out=out, overwrite=True, device=self.device)
            ckpt = SafetensorsCheckpoint(out)
            try:
                self._load({n: ckpt.read(n) for n in ckpt.tensors()})
            finally:
                ckpt.close()

    def _load(self, tensors: dict[str, Any]) -> None:
        missing, unexpected = self.model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        if unexpected or (set(missing) - {"lm_head.weight"}):
            raise MergeEngineError(f"search: the built model does not fit its config (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]})")
        if missing:
            self.model.tie_weights()


def task_scorer(spec: SearchSpec, base_dir: Path) -> Any:
    """A callable ``(model, tokenizer) -> {task: score}`` for the search's tasks."""
    if isinstance(spec.tasks, str):
        return _JsonlScorer(spec, base_dir)
    from mergeengine.eval.lmeval import LmEvalScorer

    return LmEvalScorer(spec.tasks, base_dir, batch_size=spec.batch_size, limit=spec.limit)


class _JsonlScorer:
    """The built-in JSONL tasks: greedy exact-match accuracy."""

    def __init__(self, spec: SearchSpec, base_dir: Path) -> None:
        from mergeengine.eval import load_tasks

        assert isinstance(spec.tasks, str)
        path = Path(spec.tasks).expanduser()
        self.tasks = load_tasks(path if path.is_absolute() else base_dir / path)
        self.spec = spec

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from mergeengine.eval import evaluate

        result = evaluate(model, tokenizer, self.tasks, batch_size=self.spec.batch_size,
                          limit=self.spec.limit, loglik=False)
        return {t.name: t.accuracy for t in result.tasks}


def _free_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
