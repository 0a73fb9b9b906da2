"""Turn a load step's ``model`` string into an opened :class:`Checkpoint`.

``model`` is a local folder, a ``.safetensors`` file, a ``.gguf`` file, a PyTorch ``.bin`` file
or folder (with ``allow_pickle``), or a hub repo id ``org/name``. A string is tried on the hub only
when it cannot be a local path: ``./``, ``../``, ``/`` and ``~`` prefixes, or a first part that is
an existing local folder (``models/base`` beside a ``models`` folder), mean a local path, and a
missing one is "not found", so a typo never fetches a stranger's model. ``~`` expands.

Example:
    >>> ckpt = open_checkpoint("org/name", base_dir=Path("."), revision="main")  # doctest: +SKIP
    >>> resolution_of(ckpt).resolved_revision  # doctest: +SKIP
    'a3f1...'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import Checkpoint
from mergeengine.io.hub import looks_like_repo_id, resolve_hub_model

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a load step's model was found (for provenance and messages).

    Attributes:
        spec: the ``model`` string as written in the recipe.
        path: the local file or folder opened.
        revision: the revision asked for (hub only).
        resolved_revision: the commit sha it resolved to (hub only; None for local paths).
        repo_id: ``org/name`` for hub models, None for local paths.
        root: the folder the model's files may resolve into: for hub models the repo's cache
            folder (snapshots link to its blobs); None for local paths (their own folder).
    """

    spec: str
    path: Path
    revision: str | None = None
    resolved_revision: str | None = None
    repo_id: str | None = None
    root: Path | None = None

    @property
    def is_hub(self) -> bool:
        """Whether the model came from the hub."""
        return self.repo_id is not None


def resolve_model(
    model: str, *, base_dir: Path, revision: str | None = None, allow_pickle: bool = False
) -> ResolvedModel:
    """Find the local file or folder a load step's ``model`` names, downloading from the hub if needed.

    Args:
        model: a local path (relative to ``base_dir``) or a hub repo id ``org/name``.
        base_dir: folder relative paths are resolved against (the recipe's folder).
        revision: hub branch, tag or commit sha (ignored, with a warning, for local paths).
        allow_pickle: a hub repo without safetensors may supply ``pytorch_model*.bin``.

    Returns:
        The resolved location.

    Raises:
        ModelError: no such local path and not a repo id, or the hub could not supply it.
    """
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) / path).resolve()
    if path.exists():
        if revision is not None:
            LOG.warning(
                "%s: 'revision: %s' ignored: it applies to hub repo ids, this is a local path",
                model,
                revision,
            )
        return ResolvedModel(model, path)
    if path.suffix != ".gguf" and looks_like_repo_id(model) and not path.parent.is_dir():
        try:
            snap = resolve_hub_model(model, revision, allow_pickle=allow_pickle)
        except ModelError as exc:
            exc.message = f"{exc.message} (no local path {path} either)"
            exc.args = (exc.message,)
            raise
        return ResolvedModel(model, snap.folder, revision, snap.commit, model, root=snap.folder.parent.parent)
    if path.suffix == ".gguf":
        raise ModelError("GGUF file not found", file=str(path))
    if looks_like_repo_id(model):  # its first part is a local folder: a path, never a hub id
        hint = f" ({path.parent} exists, so this is a local path, not a hub repo id)"
    else:
        hint = "" if "/" in model else " (hub repo ids have the form org/name)"
    raise ModelError(f"model not found: no such file or folder{hint}", file=str(path))


def _open_path(path: Path, *, allow_pickle: bool) -> Checkpoint:
    from mergeengine.io.torch_reader import TORCH_SUFFIXES, TorchBinCheckpoint, has_torch_weights

    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError("GGUF file not found", file=str(path))
        from mergeengine.io.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(path)
    is_torch_file = path.is_file() and path.suffix in TORCH_SUFFIXES
    is_torch_folder = path.is_dir() and not any(path.glob("*.safetensors")) and has_torch_weights(path)
    if is_torch_file or is_torch_folder:
        if not allow_pickle:
            raise ModelError(
                "PyTorch pickle weights (.bin) can run code when loaded; set 'allow_pickle: true' on the load "
                "step to read them (with torch.load(weights_only=True)), or convert them to safetensors",
                file=str(path),
            )
        return TorchBinCheckpoint(path)
    from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

    return SafetensorsCheckpoint(path)


def open_checkpoint(
    model: str, *, base_dir: Path, revision: str | None = None, allow_pickle: bool = False
) -> Checkpoint:
    """Open the model a load step names.

    The returned checkpoint carries a ``resolved`` attribute (a :class:`ResolvedModel`; read it
    with :func:`resolution_of`) holding the local path and, for hub models, the commit sha.

    Args:
        model: a local folder, a ``.safetensors``/``.gguf``/``.bin`` file, or a hub repo id
            ``org/name``, optionally followed by ``+ADAPTER`` (a peft LoRA adapter folder,
            applied per tensor by :class:`mergeengine.io.lora.LoraCheckpoint`); relative paths are resolved against ``base_dir`` (the recipe's folder).
        base_dir: folder relative paths are resolved against.
        revision: hub revision: branch, tag or commit sha (hub ids only).
        allow_pickle: read PyTorch ``.bin`` checkpoints (``torch.load(weights_only=True)``).
            Safetensors are preferred when a folder has both.

    Returns:
        The opened checkpoint (headers read, no tensor data).

    Raises:
        ModelError: the model cannot be found, fetched or read, or is pickle without ``allow_pickle``.
    """
    from mergeengine.io.lora import LoraCheckpoint, split_lora_reference

    base, adapter = split_lora_reference(model)
    if adapter is not None and not (Path(base_dir) / Path(model).expanduser()).exists():
        # mergekit's ``model+lora``: the base model with a peft LoRA adapter applied per tensor
        resolved = resolve_model(base, base_dir=base_dir, revision=revision, allow_pickle=allow_pickle)
        lora_path = resolve_model(adapter, base_dir=base_dir).path
        ckpt: Checkpoint = LoraCheckpoint(_open_path(resolved.path, allow_pickle=allow_pickle), lora_path)
        ckpt.resolved = resolved  # type: ignore[attr-defined]
        return ckpt
    resolved = resolve_model(model, base_dir=base_dir, revision=revision, allow_pickle=allow_pickle)
    ckpt = _open_path(resolved.path, allow_pickle=allow_pickle)
    ckpt.resolved = resolved  # type: ignore[attr-defined]
    return ckpt


def resolution_of(ckpt: Checkpoint) -> ResolvedModel:
    """Where a checkpoint came from.

    Args:
        ckpt: a checkpoint, ideally opened by :func:`open_checkpoint`.

    Returns:
        Its :class:`ResolvedModel`; for checkpoints built directly, one made from ``ckpt.source``.
    """
    resolved = getattr(ckpt, "resolved", None)
    if isinstance(resolved, ResolvedModel):
        return resolved
    return ResolvedModel(ckpt.source, Path(ckpt.source))
