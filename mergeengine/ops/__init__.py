"""The op registry: one module per op, each registering its class with :func:`register`.

Example:
    >>> from mergeengine.ops import get_op
    >>> get_op("diff").name
    'diff'
"""

from __future__ import annotations

from mergeengine.errors import MergeEngineError
from mergeengine.ops.base import Op

OPS: dict[str, type[Op]] = {}
MERGE_METHODS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: make an op available to recipes under ``cls.name``. Duplicates are errors."""
    if cls.name in OPS:
        raise MergeEngineError(f"op '{cls.name}' is registered twice ({OPS[cls.name].__module__}, {cls.__module__})")
    OPS[cls.name] = cls
    return cls


def register_method(cls: type[Op]) -> type[Op]:
    """Class decorator: make a merge method available as ``op: merge, method: <cls.method>``."""
    method = cls.method  # type: ignore[attr-defined]
    if method in MERGE_METHODS:
        raise MergeEngineError(f"merge method '{method}' is registered twice")
    MERGE_METHODS[method] = cls
    return cls


def get_op(name: str, method: str | None = None) -> type[Op]:
    """Look an op (or merge method) up by name.

    Raises:
        MergeEngineError: unknown name, with the available ones listed.
    """
    _load_all()
    if name == "merge" and method is not None:
        if method not in MERGE_METHODS:
            raise MergeEngineError(f"Unknown merge method '{method}'. Available: {', '.join(sorted(MERGE_METHODS))}")
        return MERGE_METHODS[method]
    if name not in OPS and name != "merge":
        raise MergeEngineError(f"Unknown op '{name}'. Available: {', '.join(sorted([*OPS, 'merge']))}")
    return OPS[name]


_LOADED = False


def _load_all() -> None:
    """Import every op module once so that their decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from mergeengine.ops import (  # noqa: F401
        breadcrumbs,
        dare,
        diff,
        dp_prune,
        dpa_amplify,
        load,
        magnitude_prune,
        merge,
        save,
        ties,
    )
