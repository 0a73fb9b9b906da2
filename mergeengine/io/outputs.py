"""A run's output folders, set up safely: guarded destinations, confined extra files, verified resume.

:func:`output_folders` builds one :class:`OutputFolder` per save step, refusing nested destinations
and telling each what an overwrite must spare (see :mod:`mergeengine.io.output_guard`).
:func:`copy_file_sources` finds, before anything is computed, every tokenizer and ``copy_files``
file a save step copies, each a plain file inside its model's folder. :func:`verify_resume` decides
whether an interrupted run's shards may be kept: only when its inputs had the same content.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergeengine.errors import OutputError
from mergeengine.io.checkpoint import confined_file
from mergeengine.io.output_guard import check_distinct, default_protected
from mergeengine.io.resolve import resolution_of
from mergeengine.io.writer import OutputFolder, read_journal

if TYPE_CHECKING:
    from mergeengine.graph.plan import Plan
    from mergeengine.recipe.loader import LoadedRecipe

LOG = logging.getLogger(__name__)

ResumeMode = Literal["verify", "restart"]


def output_folders(plan: Plan, loaded: LoadedRecipe, *, overwrite: bool) -> dict[str, OutputFolder]:
    """One guarded output folder per save step of ``plan``.

    Raises:
        OutputError: two save steps write the same or nested folders.
    """
    paths = {s: plan.save_paths[s] for s in plan.save_order}
    check_distinct(paths)
    recipe_dir = loaded.base_dir if loaded.path != "<string>" else None
    protected = default_protected(recipe_dir)
    inputs = {sid: [resolution_of(c).path, *c.weight_files()] for sid, c in plan.checkpoints.items()}
    return {s: OutputFolder(p, overwrite=overwrite, step=s, protected=protected, inputs=inputs)
            for s, p in paths.items()}


def copy_file_sources(plan: Plan, save: str) -> dict[str, Path]:
    """The ``copy_files`` of a save step: output name -> the real source file; checks the tokenizer's too.

    Run before anything is computed. Tokenizer files come from ``tokenizer_from`` (or the origin
    model), ``copy_files`` from the origin model's folder; each must be a plain file inside that
    folder once symlinks are resolved.

    Raises:
        ModelError: a file is missing, outside its model's folder, or not a plain file.
    """
    op: Any = plan.ops[save]
    origin = plan.steps.kinds[save].origin
    tok_from = op.step.tokenizer_from or origin
    plan.checkpoints[tok_from].support_sources()
    sources: dict[str, Path] = {}
    ckpt = plan.checkpoints[origin]
    folder = Path(ckpt.source) if Path(ckpt.source).is_dir() else Path(ckpt.source).parent
    root = getattr(ckpt.resolved, "root", None) or folder
    for name in op.step.copy_files:
        target = Path(name).name  # the step's schema refused names of the writer's own files
        sources[target] = confined_file(folder / name, root, what=f"copy_files: '{name}'")
    return sources


def identity(hashes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What identifies a run's inputs: per load step, each weight file's sha256 (and the hub commit)."""
    return {sid: {"files": h["files"], "resolved_revision": h.get("resolved_revision")}
            for sid, h in sorted(hashes.items())}


def verify_resume(folder: OutputFolder, plan_id: str, current: dict[str, Any], mode: ResumeMode) -> None:
    """Keep an interrupted run's shards only if its inputs had the content they have now.

    Args:
        folder: the output folder (its temporary folder holds the interrupted run's shards).
        plan_id: this run's plan digest (progress of another plan is not resumed anyway).
        current: :func:`identity` of this run's inputs.
        mode: ``verify``: refuse when the inputs changed; ``restart``: discard the shards then.

    Raises:
        OutputError: ``verify`` and the inputs changed (or were not recorded).
    """
    journal = read_journal(folder.tmp)
    if journal.get("plan_id") != plan_id or not journal.get("shards"):
        return
    recorded = journal.get("inputs")
    if recorded == current:
        return
    change = _first_change(recorded, current)
    if mode == "restart":
        LOG.warning("step '%s': %s; starting over", folder.step, change)
        folder.restart()
        return
    raise OutputError(f"cannot resume: {change}; rerun with --resume=restart to start over "
                      f"(finished shards are in {folder.tmp})", step=folder.step)


def _first_change(recorded: Any, current: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "the interrupted run recorded no input hashes"
    for sid, now in current.items():
        then = recorded.get(sid)
        if not isinstance(then, dict):
            return f"load step '{sid}' was not an input of the interrupted run"
        then_files = then.get("files") if isinstance(then.get("files"), dict) else {}
        for name, sha in now["files"].items():
            if then_files.get(name) != sha:
                return f"input '{sid}' changed since the interrupted run: {name} now has sha256 {sha[:12]}"
        if then_files.keys() != now["files"].keys() or then.get("resolved_revision") != now["resolved_revision"]:
            return f"input '{sid}' changed since the interrupted run (other files or revision)"
    return "the inputs changed since the interrupted run"
