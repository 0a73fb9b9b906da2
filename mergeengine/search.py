"""The DPA factor search (docs/recipes.md, "what makes DPA dynamic"): coordinate ascent on a validation score.

score = geometric mean over tasks of (accuracy / accuracy of the dense fine-tuned model).
For each factor in order: start at its value (1.0 if below 0.1), add ``step_size`` while the score
improves, keep the last value that improved, move on. Every candidate is a full build of the
target save step — in memory when it fits, else through a temporary folder — and an evaluation;
every (factors, scores) pair is recorded.

```yaml
search:
  tasks: tasks.val.yaml
  factors:
    - {step: a_math, partition: 0}
    - {step: a_math, partition: 1, start: 0.0}
```
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeengine.errors import MergeEngineError
from mergeengine.recipe.loader import LoadedRecipe, load_recipe, parse_recipe

LOG = logging.getLogger(__name__)


@dataclass
class Trial:
    """One evaluated candidate."""

    factors: dict[str, list[float]]
    task_scores: dict[str, float]
    score: float


@dataclass
class SearchResult:
    """Every trial, the chosen factors and the recipe that reruns without searching."""

    trials: list[Trial] = field(default_factory=list)
    best_factors: dict[str, list[float]] = field(default_factory=dict)
    best_score: float = 0.0
    resolved: dict[str, Any] = field(default_factory=dict)

    def to_jsonl(self) -> str:
        """One JSON line per trial."""
        return "".join(json.dumps(t.__dict__) + "\n" for t in self.trials)


def geometric_score(accuracies: dict[str, float], references: dict[str, float]) -> float:
    """Geometric mean of accuracy / reference over the tasks (0 when any task scores 0).

    Raises:
        MergeEngineError: a task has no reference score.
    """
    missing = [t for t in accuracies if not references.get(t)]
    if missing:
        raise MergeEngineError(f"search: no reference score for task(s) {', '.join(missing)}: add "
                               "'reference' in the task file or 'references' in the search block")
    ratios = [accuracies[t] / references[t] for t in accuracies]
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _factors_of(raw: dict[str, Any]) -> dict[str, list[float]]:
    return {s["id"]: [float(p["scale"]) for p in s["partitions"]] for s in raw["steps"] if s.get("op") == "dpa_amplify"}


def _with_factors(raw: dict[str, Any], factors: dict[str, list[float]]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out.pop("search", None)
    for step in out["steps"]:
        if step.get("id") in factors:
            for part, scale in zip(step["partitions"], factors[step["id"]], strict=True):
                part["scale"] = round(scale, 10)
    return out


class _Evaluator:
    """Builds a candidate recipe's target and scores it; one transformers model reused throughout."""

    def __init__(self, loaded: LoadedRecipe, device: str) -> None:
        from mergeengine.eval import load_tasks
        from mergeengine.eval.evaluate import require_transformers

        self.transformers = require_transformers()
        self.loaded = loaded
        spec = loaded.recipe.search
        assert spec is not None
        self.spec = spec
        self.device = device
        tasks_path = Path(spec.tasks)
        if not tasks_path.is_absolute():
            tasks_path = loaded.base_dir / tasks_path
        self.tasks = load_tasks(tasks_path)
        self.references = {t.name: spec.references.get(t.name, t.reference) for t in self.tasks.tasks}
        self.target = spec.target or next(s.id for s in loaded.recipe.steps if s.op == "save")
        self.model: Any = None
        self.tokenizer: Any = None
        self.workdir = tempfile.TemporaryDirectory(prefix="mergeengine-search-")

    def _prepare(self, candidate: LoadedRecipe) -> None:
        """Config and tokenizer of the target, written once; an empty model to load tensors into."""
        from mergeengine.api import output_config, plan_recipe

        plan = plan_recipe(candidate, out=Path(self.workdir.name) / "plan-only")
        folder = Path(self.workdir.name) / "support"
        folder.mkdir(exist_ok=True)
        cfg = output_config(plan, self.target) or {}
        cfg["torch_dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(cfg))
        origin = plan.steps.kinds[self.target].origin
        tok_from = plan.ops[self.target].step.tokenizer_from or origin  # type: ignore[attr-defined]
        plan.checkpoints[tok_from].write_support_files(folder)
        self.tokenizer = self.transformers.AutoTokenizer.from_pretrained(folder)
        config = self.transformers.AutoConfig.from_pretrained(folder)
        self.model = self.transformers.AutoModelForCausalLM.from_config(config).to(self.device).eval()
        fit = plan.estimate.bytes_written * 2  # float32 copy in the model
        self.in_memory = self.spec.in_memory == "always" or (self.spec.in_memory == "auto" and fit < _free_ram() / 3)

    def __call__(self, candidate: LoadedRecipe) -> dict[str, float]:
        from mergeengine.api import build_in_memory, run_recipe
        from mergeengine.eval import evaluate

        if self.model is None:
            self._prepare(candidate)
        if self.in_memory:
            tensors = build_in_memory(candidate, self.target, device=self.device)
        else:
            from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

            if not _single_save(candidate):
                raise MergeEngineError("search: building on disk needs a recipe with one save step")
            out = Path(self.workdir.name) / "candidate"
            run_recipe(candidate, out=out, overwrite=True, device=self.device)
            ckpt = SafetensorsCheckpoint(out)
            tensors = {n: ckpt.read(n) for n in ckpt.tensors()}
        missing, unexpected = self.model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        if unexpected or (set(missing) - {"lm_head.weight"}):
            raise MergeEngineError(f"search: the built model does not fit its config (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]})")
        if missing:
            self.model.tie_weights()
        result = evaluate(self.model, self.tokenizer, self.tasks, batch_size=self.spec.batch_size,
                          device=self.device, limit=self.spec.limit, loglik=False)
        return {t.name: t.accuracy for t in result.tasks}


def _single_save(candidate: LoadedRecipe) -> bool:
    return sum(s.op == "save" for s in candidate.recipe.steps) == 1


def _free_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def run_search(
    recipe: str | Path | LoadedRecipe, *, device: str = "cpu", progress: bool = False
) -> SearchResult:
    """Tune the DPA factors named in the recipe's ``search`` block.

    Args:
        recipe: a recipe file (or loaded recipe) with a ``search`` block.
        device: where candidates are built and evaluated.
        progress: log each trial at INFO level (shown with ``-v``).

    Returns:
        All trials, the best factors and score, and the resolved recipe (no search block).

    Raises:
        MergeEngineError: no search block, no reference scores, or a build/evaluation failure.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    if loaded.recipe.search is None:
        raise MergeEngineError(f"{loaded.path}: the recipe has no 'search' block")
    from mergeengine.api import validate

    validate(loaded)
    evaluator = _Evaluator(loaded, device)
    try:
        return _climb(loaded, evaluator, progress)
    finally:  # also on a failed or interrupted trial (the CLI exits without finalizers)
        evaluator.workdir.cleanup()


def _climb(loaded: LoadedRecipe, evaluator: _Evaluator, progress: bool) -> SearchResult:
    """The search itself: each factor in turn, upward by ``step_size`` while the score improves."""
    spec = loaded.recipe.search
    assert spec is not None
    result = SearchResult()
    current = _factors_of(loaded.raw)
    scores: dict[str, float] = {}

    def score(factors: dict[str, list[float]]) -> float:
        key = json.dumps(factors, sort_keys=True)
        if key in scores:
            return scores[key]
        raw = _with_factors(loaded.raw, factors)
        candidate = parse_recipe(yaml.safe_dump(raw, sort_keys=False), loaded.path)
        accuracies = evaluator(candidate)
        s = geometric_score(accuracies, evaluator.references)
        scores[key] = s
        result.trials.append(Trial(copy.deepcopy(factors), accuracies, s))
        if progress:
            LOG.info("search trial %d: %s -> score %.4f %s", len(result.trials), factors, s, accuracies)
        return s

    for f in spec.factors:
        value = f.start if f.start is not None else current[f.step][f.partition]
        if value < 0.1:  # docs/recipes.md: a factor starting below 0.1 starts its search at 1.0
            value = 1.0
        current[f.step][f.partition] = value
        best = score(current)
        for _ in range(spec.max_steps):
            trial = copy.deepcopy(current)
            trial[f.step][f.partition] = round(value + spec.step_size, 10)
            s = score(trial)
            if s <= best:
                break  # keep the last value that improved (the release steps back one increment)
            best, value, current = s, trial[f.step][f.partition], trial
    result.best_factors = current
    result.best_score = score(current)
    result.resolved = _with_factors(loaded.raw, current)
    return result


def write_search_outputs(loaded: LoadedRecipe, result: SearchResult, out: Path | None = None) -> tuple[Path, Path]:
    """Write ``<recipe>.resolved.yaml`` (reruns without searching) and ``<recipe>.search.jsonl`` (every trial)."""
    base = Path(loaded.path)
    resolved = out or base.with_name(base.stem + ".resolved.yaml")
    header = (f"# Resolved by `mergeengine search {base.name}`: factors {json.dumps(result.best_factors)}, "
              f"validation score {result.best_score:.4f} after {len(result.trials)} trials.\n")
    resolved.write_text(header + yaml.safe_dump(result.resolved, sort_keys=False))
    log = resolved.with_name(base.stem + ".search.jsonl")
    log.write_text(result.to_jsonl())
    return resolved, log
