"""SHA-256 of input weight files, for provenance, computed once per file version.

Files in a Hugging Face cache are free: a snapshot entry is a symlink to
``models--org--name/blobs/<etag>``, and for LFS files (every weight file) the etag the hub serves
is the file's SHA-256 (the LFS object id), 64 hex digits. Small git-tracked files have a 40-hex
git blob sha1 as etag instead, which is no SHA-256 and is not trusted. huggingface_hub 2.x may
turn ``blobs/<etag>`` itself into a symlink to a cache-wide store named by the *Xet* hash (also 64
hex, but not a SHA-256), so the link chain is followed one hop at a time and only a
``blobs/<name>`` directly inside a repo folder counts.

Other files are hashed in 8 MiB chunks; results are cached in ``$MERGEENGINE_CACHE/sha256.json``
(default ``~/.cache/mergeengine``) keyed by absolute path, size, mtime, inode and ctime, so reruns on
the same inputs do not read them again. Size and mtime alone are not an identity: ``cp -p`` and
``rsync -a`` give new content the old ones; a new file (or a write in place) always gets a new
ctime, which no tool can set back.

Example:
    >>> file_sha256(Path("models/base/model.safetensors"))  # doctest: +SKIP
    '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mergeengine.io.checkpoint import Checkpoint

LOG = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
CACHE_FILE_NAME = "sha256.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REPO_FOLDER_RE = re.compile(r"(models|datasets|spaces|kernels)--.+")
_MAX_LINK_HOPS = 8


def hash_cache_path() -> Path:
    """The JSON file sha256 results are cached in: ``$MERGEENGINE_CACHE/sha256.json``.

    Returns:
        The path (``~/.cache/mergeengine/sha256.json`` when the variable is unset).
    """
    root = os.environ.get("MERGEENGINE_CACHE")
    if root:
        return Path(root).expanduser() / CACHE_FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mergeengine" / CACHE_FILE_NAME


def hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache entry's blob name gives, without reading the file.

    Args:
        path: a file, typically ``.../snapshots/<commit>/<name>``.

    Returns:
        The 64-hex blob name when ``path`` is (or links, hop by hop, to) ``<repo folder>/blobs/<sha256>``;
        None otherwise (not in a hub cache, a git-sha1 etag, a copy made without symlinks).
    """
    current = Path(os.path.abspath(path))
    for _ in range(_MAX_LINK_HOPS):
        parent = current.parent
        if (
            parent.name == "blobs"
            and _REPO_FOLDER_RE.fullmatch(parent.parent.name)
            and _SHA256_RE.fullmatch(current.name)
            and current.exists()
        ):
            return current.name
        if not current.is_symlink():
            return None
        target = Path(os.readlink(current))
        current = Path(os.path.abspath(parent / target)) if not target.is_absolute() else target
    return None


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        LOG.warning("%s: unreadable sha256 cache, starting a new one", path)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, entry_path: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache file, atomically (re-read first: other runs may have written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files = _read_cache(path)
        files[entry_path] = entry
        fd, tmp = tempfile.mkstemp(prefix=".sha256.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        LOG.warning("%s: cannot update the sha256 cache (%s); hashes will be recomputed next run", path, exc)


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, hex: from the hub cache's blob name, the hash cache, or by reading it.

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    from_hub = hub_blob_sha256(path)
    if from_hub is not None:
        return from_hub
    real = path.resolve(strict=True)
    st = real.stat()
    key = str(real)
    cache_path = hash_cache_path()
    cached = _read_cache(cache_path).get(key)
    stamp = _file_stamp(st)
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in stamp.items()) \
            and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    _write_cache(cache_path, key, {**stamp, "sha256": digest})
    return digest


def _file_stamp(st: os.stat_result) -> dict[str, int]:
    """What must be unchanged for a cached hash to stand (ctime: any content change moves it)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def checkpoint_provenance(
    ckpt: Checkpoint, model_spec: str, revision: str | None = None, resolved_revision: str | None = None
) -> dict[str, Any]:
    """What was read for one load step: where from, which revision, and each weight file's SHA-256.

    Args:
        ckpt: the opened checkpoint.
        model_spec: the load step's ``model`` string, as written.
        revision: the revision asked for (hub only).
        resolved_revision: the commit sha it resolved to (hub only); from
            ``mergeengine.io.resolve.resolution_of(ckpt).resolved_revision``.

    Returns:
        ``{"model", "resolved_path", "revision", "resolved_revision", "files": {name: sha256}}``;
        file names are relative to the checkpoint's folder.

    Raises:
        FileNotFoundError: a weight file vanished since the checkpoint was opened.
    """
    source = Path(ckpt.source)
    folder = source if source.is_dir() else source.parent
    files: dict[str, str] = {}
    for f in ckpt.weight_files():
        f = Path(f)
        try:
            name = str(f.relative_to(folder))
        except ValueError:
            name = str(f)
        files[name] = file_sha256(f)
    return {
        "model": model_spec,
        "resolved_path": str(source),
        "revision": revision,
        "resolved_revision": resolved_revision,
        "files": files,
    }
