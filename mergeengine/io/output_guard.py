"""What a recipe may do to the filesystem: which folders it may replace, and one run per destination.

A recipe is shared input, so its ``save.path`` is untrusted. Before anything is computed,
:func:`check_destination` refuses a destination that is a filesystem root and, for ``--overwrite``,
any folder that mergeengine did not write (recognised by its ``mergeengine.json``) unless it is
empty, the home folder, the current folder or the recipe's folder (or an ancestor of any of them),
and any folder that holds an input of the run. :func:`check_distinct` refuses two save steps that
write the same or nested folders. :class:`RunLock` keeps a second run off a destination while one
is writing it, and :func:`replace_folder` swaps a finished folder in so that, on failure, the old
one is back in place; :func:`recover_replace` finishes a swap that a crash interrupted.

Example:
    >>> check_destination(Path("out"), overwrite=True, protected={"the recipe's folder": Path(".")}, inputs={})  # doctest: +SKIP
    >>> with RunLock(Path("out")):  # doctest: +SKIP
    ...     replace_folder(Path(".out.partial"), Path("out"))
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from mergeengine.errors import OutputError

LOG = logging.getLogger(__name__)

PROVENANCE_NAME = "mergeengine.json"


def written_by_mergeengine(folder: Path) -> bool:
    """Whether ``folder`` holds a ``mergeengine.json`` that mergeengine wrote (a provenance record)."""
    record = folder / PROVENANCE_NAME
    if record.is_symlink() or not record.is_file():
        return False
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    return isinstance(prov, dict) and "mergeengine_version" in prov


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def default_protected(recipe_dir: Path | None) -> dict[str, Path]:
    """The folders ``--overwrite`` never replaces (nor any ancestor of them): home, current, recipe's."""
    protected = {"the home folder": Path.home(), "the current folder": Path.cwd()}
    if recipe_dir is not None:
        protected["the recipe's folder"] = Path(recipe_dir)
    return {what: Path(os.path.realpath(p)) for what, p in protected.items()}


def check_destination(
    dest: Path, *, overwrite: bool, protected: dict[str, Path], inputs: dict[str, list[Path]], step: str = ""
) -> None:
    """Refuse a destination this run must not create or replace. Writes nothing.

    Args:
        dest: the output folder (absolute).
        overwrite: whether an existing folder may be replaced.
        protected: description -> folder that must survive (see :func:`default_protected`).
        inputs: load step id -> the files and folders it reads.
        step: the save step, for messages.

    Raises:
        OutputError: one line saying why, naming the folder.
    """
    real = Path(os.path.realpath(dest))
    if real.parent == real or not dest.name:
        raise OutputError("a filesystem root cannot be an output folder", file=str(dest), step=step)
    if not (dest.exists() or dest.is_symlink()):
        return
    if not overwrite:
        raise OutputError("output path exists; pass --overwrite to replace it", file=str(dest), step=step)
    if not dest.is_dir() or dest.is_symlink():
        raise OutputError("--overwrite replaces only folders, and this is not one", file=str(dest), step=step)
    for what, folder in protected.items():
        if _is_within(folder, real):
            relation = "is" if folder == real else "holds"
            raise OutputError(f"--overwrite refused: this folder {relation} {what}; write the output elsewhere "
                              "(--out DIR)", file=str(dest), step=step)
    for sid, paths in inputs.items():
        for p in paths:
            if _is_within(Path(os.path.realpath(p)), real):
                raise OutputError(f"--overwrite refused: this folder holds the input of load step '{sid}' ({p}); "
                                  "write the output elsewhere (--out DIR)", file=str(dest), step=step)
    if not written_by_mergeengine(real) and any(real.iterdir()):
        raise OutputError(f"--overwrite refused: this folder was not written by mergeengine (no {PROVENANCE_NAME}) "
                          "and is not empty; remove it yourself or choose another path", file=str(dest), step=step)


def check_distinct(paths: dict[str, Path]) -> None:
    """Refuse two save steps whose folders are the same or nested (one would overwrite the other).

    Raises:
        OutputError: naming both steps.
    """
    items = sorted((Path(os.path.realpath(p)), s) for s, p in paths.items())
    for i, (a, sa) in enumerate(items):
        for b, sb in items[i + 1:]:
            if _is_within(b, a):
                how = "the same folder" if a == b else "nested folders"
                raise OutputError(f"save steps '{sa}' and '{sb}' write {how} ({a}, {b}): give each its own path",
                                  file=str(b))
    for a, sa in items:
        work = {a.parent / f".{a.name}.partial", a.parent / f".{a.name}.lock"}
        for b, sb in items:
            if any(_is_within(b, w) for w in work):
                raise OutputError(f"save step '{sb}' writes into the work folder of save step '{sa}': "
                                  "give it another path", file=str(b))


def _is_complete_output(folder: Path) -> bool:
    """Whether ``folder`` is a whole mergeengine output: its provenance record, config and every weight file."""
    if folder.is_symlink() or not folder.is_dir() or not written_by_mergeengine(folder):
        return False
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False
    return (folder / "config.json").is_file() and all((folder / str(s)).is_file() for s in shards)


def recover_replace(dest: Path) -> None:
    """Finish an ``--overwrite`` replace that a crash cut short; call it holding the destination's :class:`RunLock`.

    :func:`replace_folder` renames the old output to ``.NAME.old-XXXXXXXX`` before moving the new
    one in. Such a folder that mergeengine wrote (its ``mergeengine.json`` inside) is renamed back
    when the destination is missing, and removed when the destination is a complete output; one
    warning line each. Folders mergeengine did not write are never touched.

    Raises:
        OutputError: a leftover cannot be renamed back.
    """
    leftovers = [p for p in dest.parent.glob(f".{dest.name}.old-*")
                 if not p.is_symlink() and p.is_dir() and written_by_mergeengine(p)]
    leftovers.sort(key=lambda p: (p / PROVENANCE_NAME).stat().st_mtime, reverse=True)
    if leftovers and not (dest.exists() or dest.is_symlink()) and _is_complete_output(leftovers[0]):
        try:
            os.replace(leftovers[0], dest)
        except OSError as exc:
            raise OutputError(f"cannot restore the previous output from {leftovers[0]} "
                              f"({exc.strerror or exc})", file=str(dest)) from None
        LOG.warning("%s: restored the previous output from %s (a run died while replacing it)", dest,
                    leftovers[0].name)
        leftovers = leftovers[1:]
    if not _is_complete_output(dest):
        return
    for old in leftovers:
        shutil.rmtree(old, ignore_errors=True)
        LOG.warning("%s: removed %s, the previous output a run died before removing", dest, old.name)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only; elsewhere
    Python runs no signal handlers to hold back)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(
            signal.getsignal(s) is None for s in signals):
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def replace_folder(new: Path, dest: Path) -> None:
    """Move the finished folder ``new`` to ``dest``; an existing ``dest`` is replaced only once ``new`` is in.

    The old folder is renamed aside, the new one renamed in, then the old one removed. When the
    second rename fails, the old folder is renamed back. Ctrl-C or SIGTERM during the renames
    takes effect after them, so no interrupt leaves ``dest`` missing.

    Raises:
        OutputError: the rename failed; the message says where the old and the new folder are.
    """
    with interrupts_deferred():
        old = _swap(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap(new: Path, dest: Path) -> Path | None:
    """The two renames of :func:`replace_folder`; returns where the old folder went (None: there was none)."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        try:
            os.replace(dest, old)
        except OSError as exc:
            raise OutputError(f"cannot move the previous output aside ({exc.strerror or exc}); it is untouched "
                              f"and the new output is in {new}", file=str(dest)) from None
    try:
        os.replace(new, dest)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if old is None:
            raise OutputError(f"cannot move the new output into place ({reason}); it is in {new}",
                              file=str(dest)) from None
        try:
            os.replace(old, dest)
        except OSError:
            raise OutputError(f"cannot move the new output into place ({reason}) nor restore the previous one: "
                              f"the previous output is in {old}, the new one in {new}", file=str(dest)) from None
        raise OutputError(f"cannot move the new output into place ({reason}); the previous output is back in "
                          f"place and the new one is in {new}", file=str(dest)) from None
    return old


def write_error(exc: OSError, path: Path) -> OutputError:
    """The one-line error for a failed write of ``path``: disk full, permission denied, or the system's reason."""
    if exc.errno == errno.ENOSPC:
        return OutputError("disk full while writing; free space and rerun", file=str(path))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError("permission denied", file=str(path))
    return OutputError(f"cannot write: {exc.strerror or exc}", file=str(path))


def _write_bytes(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: into a hidden sibling, fsynced, then renamed over ``path``.

    Raises:
        OutputError: it cannot be written (disk full, permission denied); ``path`` is as it was.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_bytes(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunLock:
    """An exclusive lock on a destination, held while a run writes it: ``.<name>.lock`` beside it.

    The lock is an ``fcntl.flock`` on that file, so the kernel releases it when its process dies: a
    killed run leaves a lock file that the next run simply takes over (and can ``--resume``). The
    file holds the pid of the run holding it, for the message another run gets.

    Args:
        dest: the destination folder (its parent must exist).
        step: the save step, for messages.

    Raises:
        OutputError: on :meth:`acquire`, when another live run holds the lock.
    """

    def __init__(self, dest: Path, step: str = "") -> None:
        self.dest = dest
        self.step = step
        self.path = dest.parent / f".{dest.name}.lock"
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock at once, or fail: ``another run (pid N) is writing DEST``."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock the output: {exc.strerror}", file=str(self.path)) from None
                raise OutputError(f"another run (pid {holder}) is writing {self.dest}", step=self.step) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(fd).st_ino:  # not a file its last holder removed while we opened it
                break
            os.close(fd)
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous:
            LOG.info("%s: taking over the lock of a run that ended (pid %s)", self.dest, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file: {exc.strerror}", file=str(self.path)) from None

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, so no one locks a file about to vanish)."""
        if self._fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
