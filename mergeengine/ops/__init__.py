"""The op registry: one module per op, each registering its class with :func:`register`.

Example:
    >>> from mergeengine.ops import get_op
    >>> get_op("diff").name
    'diff'
"""

from __future__ import annotations

from mergeengine.errors import MergeEngineError
from mergeengine.methods import get_method, load_methods
from mergeengine.ops.base import Op

OPS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: make an op available to recipes under ``cls.name``. Duplicates are errors."""
    if cls.name in OPS:
        raise MergeEngineError(f"op '{cls.name}' is registered twice ({OPS[cls.name].__module__}, {cls.__module__})")
    OPS[cls.name] = cls
    return cls


def get_op(name: str, method: str | None = None) -> type[Op]:
    """Look an op up by name (for ``merge``, ``method`` must be a registered merge method).

    Raises:
        MergeEngineError: unknown name, with the available ones listed.
    """
    _load_all()
    if name not in OPS:
        raise MergeEngineError(f"Unknown op '{name}'. Available: {', '.join(sorted(OPS))}")
    if name == "merge" and method is not None:
        get_method(method)
    return OPS[name]


_LOADED = False


def _load_all() -> None:
    """Import every op module and merge method once so that their decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from mergeengine.ops import (  # noqa: F401
        dare,
        diff,
        dp_prune,
        dpa_amplify,
        load,
        magnitude_prune,
        merge,
        save,
        slices,
        vocab_align,
    )

    load_methods()
