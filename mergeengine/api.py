"""Python API: validate, plan and run recipes (the CLI is a thin layer over these).

Example:
    >>> from mergeengine.api import run_recipe
    >>> result = run_recipe("recipes/examples/task_arithmetic.yaml", out="merged")  # doctest: +SKIP
    >>> result.stats.tensors_written  # doctest: +SKIP
    21
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeengine.errors import MergeEngineError, RunInterrupted
from mergeengine.executor import DictSink, RunStats, Sink, execute
from mergeengine.graph.plan import Plan, TaskKey, build_plan, restrict
from mergeengine.graph.steps import StepGraph, build_step_graph
from mergeengine.io.checkpoint import Checkpoint
from mergeengine.io.outputs import ResumeMode, copy_file_sources, identity, output_folders, verify_resume
from mergeengine.io.writer import OutputFolder, ShardedWriter
from mergeengine.ops.save import SaveOp
from mergeengine.recipe.loader import LoadedRecipe, load_recipe, parse_recipe

__all__ = ["RunResult", "build_in_memory", "load_recipe", "plan_recipe", "run_recipe", "validate"]

LOG = logging.getLogger(__name__)


@dataclass
class RunResult:
    """The outcome of :func:`run_recipe`."""

    plan: Plan
    stats: RunStats
    outputs: dict[str, Path] = field(default_factory=dict)


def validate(recipe: str | Path | LoadedRecipe) -> StepGraph:
    """Validate a recipe (schema, references, order, cycles, kinds) without touching any weight.

    Raises:
        RecipeError: one line per problem.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    return build_step_graph(loaded)


def plan_recipe(recipe: str | Path | LoadedRecipe, *, out: str | Path | None = None) -> Plan:
    """Validate a recipe and build its tensor plan from the inputs' headers (no tensor data read)."""
    return build_plan(validate(recipe), out=out)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeEngineError("--device cuda but no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


class _Progress:
    """tqdm bars, one per pass, counted in tensors, with bytes read/written in the postfix."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.enabled = enabled
        self.plan = plan
        self.labels = plan.phase_labels()
        units: dict[int, int] = {}
        for k in plan.order:
            if self._is_unit(k):
                units[plan.phase[k]] = units.get(plan.phase[k], 0) + 1
        self.units = units
        self.bar: Any = None
        self.cur_phase = -1
        self.read = self.written = 0

    def _is_unit(self, k: TaskKey) -> bool:
        return k.kind == "map" or (k.kind == "compute" and isinstance(self.plan.ops[k.step], SaveOp))

    def __call__(self, key: TaskKey, read: int, written: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        ph = self.plan.phase[key]
        if ph != self.cur_phase:
            self.close()
            self.cur_phase = ph
            n = len(self.labels)
            total = self.units.get(ph, 0)
            if total:
                self.bar = tqdm(total=total, unit="tensor", desc=f"pass {ph + 1}/{n} {self.labels[ph]}", leave=False)
        self.read += read
        self.written += written
        if self.bar is not None and self._is_unit(key):
            self.bar.update(1)
            self.bar.set_postfix_str(f"read {fmt_bytes(self.read)}, wrote {fmt_bytes(self.written)}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run_recipe(
    recipe: str | Path | LoadedRecipe,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    resume: bool | ResumeMode = False,
    progress: bool = False,
) -> RunResult:
    """Run a recipe and write every save step's folder atomically.

    Args:
        recipe: a recipe file, or an already loaded recipe.
        out: overrides the single save step's path.
        device: ``cpu``, ``cuda`` or ``auto``.
        overwrite: replace existing output folders, but only ones mergeengine wrote (or empty
            ones), never a folder that holds the recipe, the current folder, the home folder or
            an input.
        allow_nonfinite: accept NaN/Inf in the results.
        resume: keep the shards an interrupted run of the same plan finished (checked by size and
            sha256) and compute only the rest; the bytes are those of an uninterrupted run.
            ``True`` or ``"verify"``: refuse when an input's content changed since;
            ``"restart"``: start over then.
        progress: show progress bars.

    Returns:
        The plan, run statistics and the output folders.

    Raises:
        MergeEngineError: any failure. Nothing is left at the destination; finished shards stay
            in the hidden ``.<name>.partial`` sibling for ``--resume``. ``OutputError`` when another
            run is writing the same destination.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    full_plan = build_plan(validate(loaded), out=out)
    try:
        dev = resolve_device(device)
        folders = output_folders(full_plan, loaded, overwrite=overwrite)
        for s, f in folders.items():
            f.check()
            copy_file_sources(full_plan, s)
        hashes = _InputHashes(full_plan)
        return _run(full_plan, loaded, folders, hashes, dev, allow_nonfinite=allow_nonfinite,
                    resume=_resume_mode(resume), progress=progress)
    finally:
        for c in full_plan.checkpoints.values():
            c.close()


def _resume_mode(resume: bool | str) -> ResumeMode | None:
    if resume in (False, None):
        return None
    if resume is True or resume == "verify":
        return "verify"
    if resume == "restart":
        return "restart"
    raise MergeEngineError(f"resume must be 'verify' or 'restart', got {resume!r}")


def _open_writers(plan: Plan, loaded: LoadedRecipe, folders: dict[str, OutputFolder], hashes: _InputHashes,
                  resume: ResumeMode | None, opened: list[OutputFolder]) -> tuple[dict[str, ShardedWriter], Plan]:
    """Lock and create every output's work folder; with ``resume``, keep what a verified earlier run finished."""
    plan_id = _plan_id(plan, loaded)
    writers: dict[str, ShardedWriter] = {}
    skip: dict[str, set[str]] = {}
    for s, folder in folders.items():
        folder.create(resume=resume is not None)
        opened.append(folder)
        if resume is not None:
            verify_resume(folder, plan_id, identity(hashes.get()), resume)
        op = plan.ops[s]
        writers[s] = ShardedWriter(folder.tmp, plan.save_order[s], plan.metas[s], op.step.max_shard_bytes,
                                   step=s, plan_id=plan_id, input_hashes=lambda: identity(hashes.get()))
        if resume is not None:
            skip[s] = set(writers[s].resume())
            if skip[s]:
                LOG.warning("step '%s': resuming: %d of %d tensors already written", s, len(skip[s]),
                            len(plan.save_order[s]))
    return writers, restrict(plan, skip)


def _run(full_plan: Plan, loaded: LoadedRecipe, folders: dict[str, OutputFolder], hashes: _InputHashes,
         dev: torch.device, *, allow_nonfinite: bool, resume: ResumeMode | None, progress: bool) -> RunResult:
    """Execute the plan into the output folders and commit them; on failure keep what can be resumed."""
    opened: list[OutputFolder] = []
    writers: dict[str, ShardedWriter] = {}
    bar: _Progress | None = None
    outputs: dict[str, Path] = {}
    try:
        writers, plan = _open_writers(full_plan, loaded, folders, hashes, resume, opened)
        bar = _Progress(plan, progress)
        stats = execute(
            plan, dict(writers), device=dev, seed=loaded.recipe.seed, allow_nonfinite=allow_nonfinite, progress=bar
        )
        bar.close()
        for s, folder in folders.items():
            writers[s].finish()
            _finish_folder(full_plan, s, folder.tmp)
            _write_reports(full_plan, s, stats, folder.tmp)
            _write_card(full_plan, s, loaded, str(dev), folder.tmp, hashes.get())
            outputs[s] = folder.commit()
    except BaseException as exc:
        if bar is not None:
            bar.close()
        _keep_progress(exc, writers, opened)
        if outputs:  # saves committed before this one failed: their folders are complete
            _name_written(exc, outputs, folders)
        raise
    finally:
        for f in opened:
            f.release()
    return RunResult(plan, stats, outputs)


def _name_written(exc: BaseException, outputs: dict[str, Path], folders: dict[str, OutputFolder]) -> None:
    """Say in the failure which saves were committed before it (complete) and which were not.

    Raises:
        RunInterrupted: for an interrupt, carrying both lists (the CLI's message names them).
    """
    written = {s: str(dest) for s, dest in outputs.items()}
    unwritten = {s: str(f.dest) for s, f in folders.items() if s not in outputs}
    if isinstance(exc, MergeEngineError):
        exc.message += f" ({RunInterrupted(written, unwritten)})"
    elif isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
        raise RunInterrupted(written, unwritten) from exc


def _keep_progress(exc: BaseException, writers: dict[str, ShardedWriter], opened: list[OutputFolder]) -> None:
    """After a failure: stop the writers, remove work folders without finished shards, say where the rest is."""
    for w in writers.values():
        w.abort()
    kept = [f for f in opened if f.has_progress()]
    for f in opened:
        if f not in kept:
            f.discard()
    if kept and isinstance(exc, MergeEngineError):
        if str(kept[0].tmp) not in exc.message:  # a refused resume already says where they are
            exc.message += f" (finished shards kept in {kept[0].tmp}: rerun with --resume to continue)"
    elif kept:
        LOG.warning("finished shards kept in %s: rerun with --resume to continue", kept[0].tmp)


def _plan_id(plan: Plan, loaded: LoadedRecipe) -> str:
    """A digest of the recipe and the output layout. The inputs' identity (their sha256) is checked
    separately, so a changed input is a clear refusal rather than silently recomputed work."""
    h = hashlib.sha256(json.dumps(loaded.raw, sort_keys=True, default=str).encode())
    for s, names in plan.save_order.items():
        h.update(f"{s}:{plan.save_paths[s]}".encode())
        for n in names:
            m = plan.metas[s][n]
            h.update(f"{n}:{m.shape}:{m.dtype}".encode())
    return h.hexdigest()[:32]


def build_in_memory(
    recipe: str | dict[str, Any] | LoadedRecipe,
    step: str,
    *,
    device: str = "cpu",
    checkpoints: dict[str, Checkpoint] | None = None,
) -> dict[str, torch.Tensor]:
    """Compute one save step's tensors into a dict instead of a folder (small models only).

    Used by the DPA factor search to evaluate candidates without a disk round trip.

    Args:
        recipe: recipe YAML text, a recipe dict, or a loaded recipe (relative paths resolve
            against the current folder for text and dicts).
        step: the save step to build.
        device: where the math runs.
        checkpoints: opened inputs to reuse.

    Returns:
        Tensor name -> tensor in the save step's dtype, on the CPU.
    """
    if isinstance(recipe, dict):
        import yaml

        recipe = yaml.safe_dump(recipe, sort_keys=False)
    loaded = recipe if isinstance(recipe, LoadedRecipe) else parse_recipe(recipe)
    steps = validate(loaded)
    plan = build_plan(steps, roots=[step], checkpoints=checkpoints)
    sink = DictSink()
    sinks: dict[str, Sink] = {step: sink}
    execute(plan, sinks, device=resolve_device(device), seed=loaded.recipe.seed)
    return sink.tensors


def output_config(plan: Plan, save: str) -> dict[str, Any] | None:
    """config.json of a save step's output: the origin model's, with the dtype (and vocab size) updated."""
    origin = plan.steps.kinds[save].origin
    cfg = plan.checkpoints[origin].config()
    if cfg is None:
        return None
    cfg = dict(cfg)
    for sid in plan.steps.needed([save]):  # e.g. slices: num_hidden_layers
        cfg = plan.ops[sid].adjust_config(plan.step_plans[sid], cfg)
    dtype = str(plan.step_plans[save].emit_dtype).removeprefix("torch.")
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = dtype
    else:
        cfg["torch_dtype"] = dtype
    emb = plan.metas[save].get("model.embed_tokens.weight")
    if emb is not None and "vocab_size" in cfg:
        cfg["vocab_size"] = emb.shape[0]
    return cfg


def _finish_folder(plan: Plan, save: str, tmp: Path) -> None:
    """Config, tokenizer and extra files next to the shards."""
    cfg = output_config(plan, save)
    if cfg is None:
        LOG.warning("step '%s': the origin model has no config.json; the output folder has none either", save)
    else:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    op: SaveOp = plan.ops[save]  # type: ignore[assignment]
    origin = plan.steps.kinds[save].origin
    tok_from = op.step.tokenizer_from or origin
    plan.checkpoints[tok_from].write_support_files(tmp)
    for sid in plan.steps.needed([save]):  # e.g. vocab_align: the union tokenizer
        plan.ops[sid].write_files(plan.step_plans[sid], tmp)
    if op.step.chat_template is not None:
        from mergeengine.io.chat_template import resolve_chat_template, write_chat_template

        inputs = [plan.checkpoints[s] for s in plan.steps.needed([save]) if s in plan.checkpoints]
        template = resolve_chat_template(op.step.chat_template, inputs)
        if template is not None:
            write_chat_template(tmp, template)
    for target, src in copy_file_sources(plan, save).items():
        shutil.copyfile(src, tmp / target)


def _write_reports(plan: Plan, save: str, stats: RunStats, folder: Path) -> None:
    """``dppa_report.json``: the DP/DPA statistics of every step this output depends on."""
    upstream = plan.steps.needed([save])
    reports = {sid: r for sid in upstream
               if (r := plan.ops[sid].report(plan.step_plans[sid], stats.statistics.get(sid, {}))) is not None}
    if reports:
        (folder / "dppa_report.json").write_text(json.dumps(reports, indent=2) + "\n")


class _InputHashes:
    """sha256 of every input weight file, computed in a background thread during the run.

    Hashing is I/O plus ~1 GB/s of CPU; hashlib releases the GIL, so it overlaps the merge
    instead of adding to it (and repeated runs hit the hash cache).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.result: dict[str, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="input-hashes", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from mergeengine.io.hashing import checkpoint_provenance
        from mergeengine.io.resolve import resolution_of

        try:
            for sid, ckpt in self.plan.checkpoints.items():
                r = resolution_of(ckpt)
                self.result[sid] = checkpoint_provenance(ckpt, self.plan.ops[sid].step.model, r.revision,
                                                         r.resolved_revision)
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            self.error = exc

    def get(self) -> dict[str, dict[str, Any]]:
        """Wait for the hashes."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def provenance(
    plan: Plan, save: str, loaded: LoadedRecipe, device: str, hashes: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """How a save step's output was made: inputs (resolved revision, sha256 of every weight file),
    version, seed, device, the resolved parameters of every step, and a rerunnable recipe.

    Deliberately no timestamp: the same recipe on the same inputs gives the same folder.
    """
    from mergeengine import __version__

    upstream = plan.steps.needed([save])
    hashes = hashes if hashes is not None else _InputHashes(plan).get()
    inputs = {sid: hashes[sid] for sid in upstream if sid in hashes}
    recipe = json.loads(json.dumps(loaded.raw, default=str))
    recipe.pop("provenance", None)
    for step in recipe.get("steps", []):
        sid = step.get("id")
        if step.get("op") == "load" and sid in inputs:
            pin = inputs[sid]
            if pin.get("resolved_revision"):  # a hub id: pin the commit
                step["revision"] = pin["resolved_revision"]
            else:  # a local path: make it absolute so the recipe reruns from anywhere
                step["model"] = pin["resolved_path"]
        if step.get("op") == "save" and sid in plan.save_paths:
            step["path"] = str(plan.save_paths[sid])
    return {
        "mergeengine_version": __version__,
        "seed": loaded.recipe.seed,
        "device": device,
        "inputs": inputs,
        "steps": {sid: plan.ops[sid].describe() for sid in upstream},
        "recipe": recipe,
    }


def _write_card(
    plan: Plan, save: str, loaded: LoadedRecipe, device: str, folder: Path, hashes: dict[str, dict[str, Any]]
) -> None:
    """README.md (model card) and mergeengine.json."""
    from mergeengine.io.card import write_model_card

    prov = provenance(plan, save, loaded, device, hashes)
    upstream = plan.steps.needed([save])
    methods = []
    for sid in upstream:
        op = plan.ops[sid]
        name = op.label
        if name not in ("load", "save", "diff") and name not in methods:
            methods.append(name)
    hub_ids = [p["model"] for p in prov["inputs"].values() if p.get("resolved_revision")]
    write_model_card(folder, recipe_name=loaded.recipe.name, recipe_yaml=loaded.text or json.dumps(loaded.raw),
                     base_models=list(dict.fromkeys(hub_ids)), methods=methods, provenance=prov)


def summary_line(result: RunResult) -> str:
    """``wrote 21 tensors (1.2 MiB) to ./merged; read 3.4 MiB in 0.4 s; peak live memory 96.0 KiB``."""
    s = result.stats
    where = ", ".join(str(p) for p in result.outputs.values())
    return (
        f"wrote {s.tensors_written} tensors ({fmt_bytes(s.bytes_written)}) to {where}; "
        f"read {fmt_bytes(s.bytes_read)}; {s.wall_seconds:.1f} s; peak live memory {fmt_bytes(s.peak_live_bytes)}"
    )


