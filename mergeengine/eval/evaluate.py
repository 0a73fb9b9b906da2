"""Evaluate a causal LM on a task file: greedy exact match and answer log-likelihood.

transformers is imported lazily: it is the optional extra ``pip install 'mergeengine[eval]'``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergeengine.errors import MergeEngineError
from mergeengine.eval.tasks import (
    Record,
    TaskFile,
    TaskSpec,
    cut_at_stop,
    extract_answer,
    load_records,
    load_tasks,
    target_of,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOG = logging.getLogger(__name__)

INSTALL_HINT = "evaluation needs transformers: pip install 'mergeengine[eval]'"


def require_transformers() -> Any:
    """Import and return the ``transformers`` module.

    Raises:
        MergeEngineError: transformers is not installed (the message says how to install it).
    """
    try:
        import transformers
    except ImportError:
        raise MergeEngineError(INSTALL_HINT) from None
    return transformers


@dataclass
class SampleResult:
    """One evaluated record.

    Attributes:
        prompt: the prompt.
        target: what the prediction must equal.
        generation: the greedy generation, cut at the first stop string.
        prediction: the extracted answer (``None``: the rule found nothing).
        correct: ``prediction == target``.
        loglik: mean log-likelihood per token of the reference answer given the prompt.
        answer_tokens: number of tokens of the reference answer.
    """

    prompt: str
    target: str
    generation: str
    prediction: str | None
    correct: bool
    loglik: float
    answer_tokens: int


@dataclass
class TaskResult:
    """The scores of one task.

    Attributes:
        name: task name.
        num_samples: records evaluated.
        accuracy: exact-match accuracy in [0, 1].
        mean_loglik: log-likelihood of the reference answers per answer token (token-weighted mean).
        reference: the dense fine-tuned model's accuracy from the task file, if any.
        samples: per-record details.
    """

    name: str
    num_samples: int
    accuracy: float
    mean_loglik: float
    reference: float | None = None
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def relative(self) -> float | None:
        """Accuracy divided by the reference accuracy (``None`` without a reference)."""
        return None if self.reference is None else self.accuracy / self.reference


@dataclass
class EvalResult:
    """The result of :func:`evaluate`.

    Attributes:
        model: the model's folder, or a description of an in-memory model.
        tasks: one :class:`TaskResult` per task, in task-file order.
        seconds: wall time of the evaluation.
    """

    model: str
    tasks: list[TaskResult]
    seconds: float = 0.0

    def task(self, name: str) -> TaskResult:
        """The result of the task called ``name``.

        Raises:
            KeyError: no such task.
        """
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"Unknown task '{name}'. Available: {', '.join(t.name for t in self.tasks)}")

    @property
    def relative_score(self) -> float | None:
        """Geometric mean over tasks of accuracy / reference: the DPA search objective.

        ``None`` when no task has a reference; tasks without one are left out.
        """
        rel = [t.relative for t in self.tasks if t.relative is not None]
        if not rel:
            return None
        if any(r <= 0 for r in rel):
            return 0.0
        return math.exp(sum(math.log(r) for r in rel) / len(rel))

    def to_dict(self, *, samples: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; ``samples=False`` leaves out the per-record details."""
        tasks = []
        for t in self.tasks:
            d = asdict(t)
            d["relative"] = t.relative
            if not samples:
                del d["samples"]
            tasks.append(d)
        return _finite_or_none(
            {
                "model": self.model,
                "seconds": self.seconds,
                "relative_score": self.relative_score,
                "tasks": tasks,
            }
        )


def _finite_or_none(value: Any) -> Any:
    """NaN / Inf -> None, recursively, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(result: EvalResult, path: str | Path | None = None, *, samples: bool = True) -> str:
    """Serialise ``result`` as JSON, and write it to ``path`` when given.

    Args:
        result: what :func:`evaluate` returned.
        path: file to write, whole or not at all (parent folders are created).
        samples: include per-record details.

    Returns:
        The JSON text.
    """
    text = json.dumps(result.to_dict(samples=samples), indent=2, ensure_ascii=False)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from mergeengine.io.output_guard import write_text_atomic

        write_text_atomic(path, text + "\n")
    return text


def format_table(result: EvalResult) -> str:
    """A fixed-width table: one row per task (accuracy, log-likelihood, reference, relative).

    Example output::

        task        n  accuracy  loglik/tok  reference  relative
        addition  200    0.9650     -0.0412     0.9700    0.9948
        relative score (geometric mean): 0.9948
    """
    name_width = max([4] + [len(t.name) for t in result.tasks])
    header = f"{'task':<{name_width}}  {'n':>5}  {'accuracy':>8}  {'loglik/tok':>10}  {'reference':>9}  {'relative':>8}"
    lines = [header]
    for t in result.tasks:
        ref = f"{t.reference:9.4f}" if t.reference is not None else f"{'-':>9}"
        rel = f"{t.relative:8.4f}" if t.relative is not None else f"{'-':>8}"
        ll = f"{t.mean_loglik:10.4f}" if math.isfinite(t.mean_loglik) else f"{'-':>10}"
        lines.append(f"{t.name:<{name_width}}  {t.num_samples:>5}  {t.accuracy:8.4f}  {ll}  {ref}  {rel}")
    score = result.relative_score
    if score is not None:
        lines.append(f"relative score (geometric mean): {score:.4f}")
    return "\n".join(lines)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hugging Face folder, ready for :func:`evaluate`.

    Args:
        path: the model folder (config.json, safetensors, tokenizer files).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None`` / ``"auto"``: CUDA when available.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; ``None``: float32 on
            CPU (fast there), the checkpoint's dtype elsewhere.

    Raises:
        MergeEngineError: transformers is missing, or the folder cannot be loaded.
    """
    transformers = require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MergeEngineError("not a model folder (no config.json)", file=str(path))
    dev = _resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MergeEngineError(f"Unknown dtype '{dtype}'. Available: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else "auto"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MergeEngineError(f"cannot load model: {exc}".splitlines()[0], file=str(path)) from None
    model.to(dev)
    model.eval()
    return model, tokenizer


class _StopOnStrings:
    """Stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _pad_left(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer as its continuation.

    Encodes prompt+answer whole and splits at the prompt's length, so merges across the boundary
    match what the model sees at generation time; falls back to separate encodings when the
    prompt's tokens are not a prefix of the whole.
    """
    ctx = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + answer)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer(answer, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> int:
    """A padding id the model can embed: the tokenizer's pad token, else EOS, else 0.

    Padded positions are masked, so any id works, but it must be a row of the embedding: a merge
    whose vocabulary was truncated to the base's (``vocab: truncate``) keeps the fine-tune's
    tokenizer, whose added pad token (e.g. id 32000) lies past the last row.
    """
    rows = None
    if model is not None and hasattr(model, "get_input_embeddings"):
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and (rows is None or 0 <= candidate < rows):
            return int(candidate)
    return 0


@torch.inference_mode()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    task: TaskSpec,
    device: torch.device,
) -> list[str]:
    transformers = require_transformers()
    pad = _pad_id(tokenizer, model)
    ids, mask = _pad_left(prompts, pad, device)
    config = transformers.GenerationConfig(
        max_new_tokens=task.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    stopping = transformers.StoppingCriteriaList([_StopOnStrings(tokenizer, task.stop, ids.shape[1])])
    out = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=stopping
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [cut_at_stop(t, task.stop) for t in texts]


@torch.inference_mode()
def _logliks(
    model: PreTrainedModel, pairs: list[tuple[list[int], list[int]]], pad: int, device: torch.device
) -> tuple[list[float], list[list[int]]]:
    """Sum of log-probabilities of each answer given its prompt, and the most likely token at each answer position."""
    seqs = [ctx + ans for ctx, ans in pairs]
    ids, mask = _pad_left(seqs, pad, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n_max = max(1, max(len(ans) for _, ans in pairs))
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        # Left padding puts every answer at the right end: only the last n_max+1 logits are needed.
        kwargs["logits_to_keep"] = n_max + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
    logits = logits[:, -(n_max + 1) :]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # predicts the last n_max tokens
    targets = ids[:, -n_max:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = logprobs.argmax(-1)
    sums, tokens = [], []
    for i, (_, ans) in enumerate(pairs):
        sums.append(float(picked[i, n_max - len(ans) :].sum()))
        tokens.append(greedy[i, n_max - len(ans) :].tolist())
    return sums, tokens


def _score_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    records: list[Record],
    loglik: bool,
) -> list[SampleResult]:
    """Score one batch of a task: greedy generation, or one teacher-forced pass (``scoring: teacher_forced``)."""
    dev = next(model.parameters()).device
    pad = _pad_id(tokenizer, model)
    forced = spec.scoring == "teacher_forced"
    ending = spec.stop[0] if forced else ""
    pairs = [_encode_pair(tokenizer, r.prompt, r.answer + ending) for r in records]
    if forced:
        sums, greedy = _logliks(model, pairs, pad, dev)
        texts = tokenizer.batch_decode(greedy, skip_special_tokens=False)
        generations = [cut_at_stop(t, spec.stop) for t in texts]
        matched = [g == ans for g, (_, ans) in zip(greedy, pairs, strict=True)]
    else:
        generations = _generate(model, tokenizer, [ctx for ctx, _ in pairs], spec, dev)
        sums = _logliks(model, pairs, pad, dev)[0] if loglik else [math.nan] * len(pairs)
        matched = [True] * len(pairs)
    samples = []
    for record, (_, ans), gen, total, ok in zip(records, pairs, generations, sums, matched, strict=True):
        target = target_of(record, spec)
        prediction = extract_answer(spec.extract, gen)
        samples.append(
            SampleResult(
                prompt=record.prompt,
                target=target,
                generation=gen,
                prediction=prediction,
                correct=ok and prediction is not None and prediction == target,
                loglik=total / len(ans) if ans else 0.0,
                answer_tokens=len(ans),
            )
        )
    return samples


def _describe(model: Any) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or f"<in-memory {type(model).__name__}>"


def evaluate(
    model: PreTrainedModel | str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path | None,
    tasks: TaskFile | Sequence[TaskSpec] | str | Path,
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    limit: int | None = None,
    loglik: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Greedy exact-match accuracy and answer log-likelihood of a causal LM on each task.

    Prompts are batched with left padding and decoded greedily until every row has produced a
    stop string (or EOS, or ``max_new_tokens``). The log-likelihood of each reference answer
    given its prompt is computed in the same batches, teacher-forced.

    Args:
        model: a model folder, or an in-memory ``transformers`` causal LM.
        tokenizer: a tokenizer or its folder; ``None`` loads it from ``model``'s folder.
        tasks: a task file path, a loaded :class:`TaskFile`, or a list of :class:`TaskSpec`.
        batch_size: prompts per forward pass.
        device: where to run; ``None``: the in-memory model's device, else CUDA when available.
        dtype: dtype to load a folder in (see :func:`load_model`); ignored for in-memory models.
        limit: evaluate at most this many records per task (tightens the task file's limits).
        loglik: also compute the answer log-likelihood (one extra forward pass per batch); when
            False, ``loglik`` / ``mean_loglik`` are NaN. Searches that only need accuracy skip it.
        progress: show a tqdm bar counted in batches.

    Returns:
        An :class:`EvalResult` with one :class:`TaskResult` per task.

    Raises:
        MergeEngineError: transformers is missing, the model or tokenizer cannot be loaded, or
            the task file is invalid (:class:`mergeengine.eval.tasks.TaskFileError`).

    Example:
        >>> result = evaluate("out/merged", None, "tasks.yaml", batch_size=32)  # doctest: +SKIP
        >>> print(format_table(result))  # doctest: +SKIP
    """
    transformers = require_transformers()
    start = time.perf_counter()
    if batch_size < 1:
        raise MergeEngineError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(tasks, (str, Path)):
        tasks = load_tasks(tasks)
    specs = list(tasks.tasks if isinstance(tasks, TaskFile) else tasks)
    model_name, model, tokenizer, dev = _model_and_tokenizer(model, tokenizer, device, dtype)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    samples = _score_all(model, tokenizer, specs, _batches(specs, batch_size, limit), dev, loglik, progress)
    results = [_task_result(spec, samples[spec.name]) for spec in specs]
    return EvalResult(model=model_name, tasks=results, seconds=time.perf_counter() - start)


def _model_and_tokenizer(model: Any, tokenizer: Any, device: str | torch.device | None,
                         dtype: str | torch.dtype | None) -> tuple[str, Any, Any, torch.device]:
    """(name, model, tokenizer or its folder, device): a folder is loaded, an in-memory model moved."""
    if isinstance(model, (str, Path)):
        loaded, folder_tokenizer = load_model(model, device=device, dtype=dtype)
        return str(model), loaded, folder_tokenizer if tokenizer is None else tokenizer, next(loaded.parameters()).device
    if tokenizer is None:
        raise MergeEngineError("an in-memory model needs its tokenizer: pass tokenizer=")
    if device is not None:
        model.to(_resolve_device(device))
    return _describe(model), model, tokenizer, next(model.parameters()).device


def _score_all(model: Any, tokenizer: Any, specs: list[TaskSpec], batches: list[tuple[TaskSpec, list[Record]]],
               dev: torch.device, loglik: bool, progress: bool) -> dict[str, list[SampleResult]]:
    """Every batch scored in eval mode (the model's mode restored after), with an optional bar."""
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="eval", unit="batch")
    samples: dict[str, list[SampleResult]] = {spec.name: [] for spec in specs}
    try:
        for spec, records in batches:
            samples[spec.name] += _score_batch(model, tokenizer, spec, records, loglik)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return samples


def _batches(specs: list[TaskSpec], batch_size: int, limit: int | None) -> list[tuple[TaskSpec, list[Record]]]:
    """Every task's records (at most ``limit`` each) in batches of ``batch_size``."""
    batches: list[tuple[TaskSpec, list[Record]]] = []
    for spec in specs:
        if limit is not None:
            spec = spec.model_copy(update={"limit": min(limit, spec.limit or limit)})
        records = load_records(spec)
        for i in range(0, len(records), batch_size):
            batches.append((spec, records[i : i + batch_size]))
    return batches


def _task_result(spec: TaskSpec, samples: list[SampleResult]) -> TaskResult:
    """Accuracy and token-weighted mean log-likelihood of one task."""
    n_tokens = sum(s.answer_tokens for s in samples)
    result = TaskResult(name=spec.name, num_samples=len(samples), accuracy=sum(s.correct for s in samples) / len(samples),
                        mean_loglik=sum(s.loglik * s.answer_tokens for s in samples) / max(1, n_tokens),
                        reference=spec.reference, samples=samples)
    LOG.info("%s: accuracy %.4f over %d records", spec.name, result.accuracy, len(samples))
    return result
