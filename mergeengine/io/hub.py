"""Resolve a Hugging Face repo id (``org/name`` + optional revision) to a local snapshot folder.

The local cache is always tried first, so a model downloaded once is read offline without any
request. When it is missing and the hub may be used, only the files a merge needs are downloaded:
weights (safetensors; PyTorch ``.bin`` only when the load step allows pickle and the repo has no
safetensors), ``*.json`` configs and tokenizer files. Never ``*.pt``, ``*.gguf`` or sub-folders.

``huggingface_hub`` reads ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` once, at import
time. This module reads them again on every call (:func:`hub_cache_dir`, :func:`hub_offline`) and
passes ``cache_dir`` explicitly, so a variable set after import (tests, notebooks) is honoured.

Example:
    >>> snap = resolve_hub_model("meta-llama/Llama-3.2-1B", revision="main")  # doctest: +SKIP
    >>> snap.folder, snap.commit  # doctest: +SKIP
    (PosixPath('~/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/4e20...'), '4e20...')
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergeengine.errors import ModelError

LOG = logging.getLogger(__name__)

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHORT_COMMIT_RE = re.compile(r"[0-9a-f]{7,39}")
# One org/name pair, as the hub spells them (letters, digits, '-', '_', '.').
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
_LOCAL_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".json")
_TRUE = {"1", "ON", "YES", "TRUE"}

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Files besides weights worth fetching: configs, tokenizers, chat templates.
SUPPORT_SUFFIXES = (".json", ".txt", ".jinja")
SUPPORT_NAMES = ("tokenizer.model",)


@dataclass(frozen=True)
class HubSnapshot:
    """A repo revision resolved to a folder on disk.

    Attributes:
        repo_id: ``org/name``.
        revision: the revision asked for (None: the default branch, ``main``).
        commit: the commit sha the revision resolved to (the snapshot folder's name).
        folder: the snapshot folder holding the files.
    """

    repo_id: str
    revision: str | None
    commit: str
    folder: Path


def looks_like_repo_id(model: str) -> bool:
    """Whether ``model`` has the shape of a hub repo id (``org/name``), not a local path.

    Paths starting with ``.``, ``/`` or ``~``, with more than one ``/``, with a backslash, or
    ending in a weight-file suffix are local paths.

    Args:
        model: the load step's ``model`` string.

    Returns:
        True for ``org/name``.
    """
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1:
        return False
    if model.lower().endswith(_LOCAL_SUFFIXES):
        return False
    if "--" in model or ".." in model:
        return False
    return _REPO_ID_RE.fullmatch(model) is not None


def hub_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (not at import).

    Order: ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, then huggingface_hub's
    default.

    Returns:
        The cache folder (may not exist).
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_offline() -> bool:
    """Whether hub requests are disabled (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now.

    Returns:
        True when offline. An unset variable falls back to huggingface_hub's import-time value.
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in _TRUE


def _describe(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _rev(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"run `hf download {repo_id}{rev}` when online, or unset HF_HUB_OFFLINE"


def _check_revision(repo_id: str, revision: str | None) -> None:
    if revision is not None and (
        not revision.strip() or ".." in revision.split("/") or revision.startswith("/")
    ):
        raise ModelError(f"hub revision {revision!r} is not a branch, tag or commit sha", file=repo_id)


def find_cached_snapshot(
    repo_id: str, revision: str | None = None, cache_dir: Path | None = None
) -> HubSnapshot | None:
    """Look a repo revision up in the local hub cache, without any request.

    A branch or tag is resolved through ``refs/<revision>``; a full commit sha names the snapshot
    folder directly; a short sha (7+ hex digits) matches a unique cached snapshot.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit sha; None means ``main``.
        cache_dir: the hub cache; defaults to :func:`hub_cache_dir`.

    Returns:
        The snapshot, or None when this revision is not cached.
    """
    _check_revision(repo_id, revision)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    snapshots = storage / "snapshots"
    commit: str | None = None
    if COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = storage / "refs" / rev
        if ref.is_file():
            commit = ref.read_text().strip()
        elif _SHORT_COMMIT_RE.fullmatch(rev) and snapshots.is_dir():
            matches = [p.name for p in snapshots.iterdir() if p.name.startswith(rev)]
            if len(matches) == 1:
                commit = matches[0]
    if not commit:
        return None
    folder = snapshots / commit
    if not folder.is_dir():
        return None
    return HubSnapshot(repo_id, revision, commit, folder)


def snapshot_has_weights(folder: Path, *, allow_pickle: bool = False) -> bool:
    """Whether a snapshot holds a complete set of weights (all shards an index lists).

    Args:
        folder: the snapshot folder.
        allow_pickle: count PyTorch ``.bin`` weights too.

    Returns:
        True when the weights are all there.
    """

    def complete(index_name: str) -> bool | None:
        index = folder / index_name
        if not index.is_file():
            return None
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return True  # let the reader report the broken index
        return all((folder / s).is_file() for s in shards)

    st = complete(SAFETENSORS_INDEX)
    if st is not None:
        return st
    if any(folder.glob("*.safetensors")):
        return True
    if not allow_pickle:
        # a .bin-only snapshot is complete; opening it explains allow_pickle
        return (folder / "pytorch_model.bin").is_file() or (folder / TORCH_INDEX).is_file()
    pt = complete(TORCH_INDEX)
    if pt is not None:
        return pt
    return (folder / "pytorch_model.bin").is_file()


def select_repo_files(files: list[str], *, allow_pickle: bool = False, repo_id: str = "") -> list[str]:
    """Choose which of a repo's files to download for a merge.

    Root-level only: safetensors weights (a ``consolidated*.safetensors`` duplicate is skipped
    when the standard ``model*.safetensors`` set exists), ``*.json``, ``*.txt``, ``*.jinja`` and
    ``tokenizer.model``. PyTorch ``pytorch_model*.bin`` only with ``allow_pickle`` and no
    safetensors. Never ``*.pt`` or ``*.gguf``.

    Args:
        files: the repo's file paths.
        allow_pickle: accept ``.bin`` weights when there are no safetensors.
        repo_id: for messages.

    Returns:
        The file names to fetch.

    Raises:
        ModelError: no weights this tool may read.
    """
    root = [f for f in files if "/" not in f]
    weights = [f for f in root if f.endswith(".safetensors")]
    if SAFETENSORS_INDEX in root or "model.safetensors" in root:
        weights = [f for f in weights if not f.startswith("consolidated")]
    bins = [f for f in root if re.fullmatch(r"pytorch_model(-[\w.-]+)?\.bin", f)]
    use_bins = not weights
    if use_bins:
        if bins and not allow_pickle:
            raise ModelError(
                "repo has only PyTorch .bin weights; set 'allow_pickle: true' on the load step to read them",
                file=repo_id,
            )
        if not bins:
            raise ModelError(
                "repo has no safetensors (or pytorch_model.bin) weights at its root", file=repo_id
            )
        weights = bins
    support = [
        f
        for f in root
        if (f.endswith(SUPPORT_SUFFIXES) or f in SUPPORT_NAMES) and (f != TORCH_INDEX or use_bins)
    ]
    return list(dict.fromkeys(weights + support))


def _download(repo_id: str, revision: str | None, cache: Path, allow_pickle: bool) -> HubSnapshot:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = _describe(repo_id, revision)
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        wanted = select_repo_files(files, allow_pickle=allow_pickle, repo_id=repo_id)
        LOG.info("downloading %d files of %s into %s", len(wanted), what, cache)
        # exact names, escaped: snapshot_download matches allow_patterns with fnmatch
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=[glob.escape(f) for f in wanted],
        )
    except ModelError:
        raise
    except GatedRepoError:
        raise ModelError(
            f"hub repo is gated{_rev(revision)}: accept its terms on huggingface.co and log in with `hf auth login`",
            file=repo_id,
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"revision {revision!r} not found on the hub: use a branch, tag or commit sha", file=repo_id
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            "hub repo not found (or private: log in with `hf auth login`); check the model id", file=repo_id
        ) from None
    except HFValidationError as exc:
        raise ModelError(f"not a valid hub repo id: {str(exc).splitlines()[0]}", file=repo_id) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise ModelError(
            f"not in the hub cache {cache}{_rev(revision)} and huggingface_hub is offline (HF_HUB_OFFLINE was set "
            f"when it was imported); {_download_hint(repo_id, revision)}",
            file=repo_id,
        ) from None
    except Exception as exc:  # network stacks raise many types; show one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"cannot download{_rev(revision)} ({type(exc).__name__}: {first}); check the connection, or set HF_HUB_OFFLINE=1 "
            "to use the cache only",
            file=repo_id,
        ) from None
    path = Path(folder)
    return HubSnapshot(repo_id, revision, path.name, path)


def resolve_hub_model(
    repo_id: str, revision: str | None = None, *, allow_pickle: bool = False
) -> HubSnapshot:
    """Resolve ``repo_id`` at ``revision`` to a local snapshot: cache first, then (online) download.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit sha; None means the ``main`` branch.
        allow_pickle: fetch ``pytorch_model*.bin`` when the repo has no safetensors.

    Returns:
        The snapshot (folder + resolved commit sha).

    Raises:
        ModelError: not cached while offline, not found on the hub, or the download failed.
    """
    _check_revision(repo_id, revision)
    cache = hub_cache_dir()
    what = _describe(repo_id, revision)
    cached = find_cached_snapshot(repo_id, revision, cache)
    if cached is not None and snapshot_has_weights(cached.folder, allow_pickle=allow_pickle):
        LOG.debug("%s resolved from the cache: %s", what, cached.folder)
        return cached
    if hub_offline():
        if cached is not None:
            raise ModelError(
                f"cached snapshot {cached.commit}{_rev(revision)} in {cache} is missing weight files (partial download); "
                f"{_download_hint(repo_id, revision)}",
                file=repo_id,
            )
        raise ModelError(
            f"not in the hub cache {cache}{_rev(revision)} and HF_HUB_OFFLINE is set; {_download_hint(repo_id, revision)}",
            file=repo_id,
        )
    return _download(repo_id, revision, cache, allow_pickle)
