"""Deferred imports for the commands that only read recipes (``validate``).

Validation needs the ops' and merge methods' signatures, not their math, but their modules import
torch and numpy at the top (as any third-party method module will). Inside :func:`deferred`,
``import torch`` binds a stand-in module whose first attribute access imports the real one and
copies its namespace in, so validating a recipe never runs torch's import (about 1 s). Anything
that does touch torch simply loads it then; nothing behaves differently, it only starts later.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any

#: The heavy libraries validation never uses.
HEAVY = ("torch", "numpy", "safetensors")


class _Deferred(types.ModuleType):
    """A module whose real import happens on the first attribute it is asked for."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer(names: tuple[str, ...] = HEAVY) -> list[str]:
    """Make later ``import`` statements of ``names`` bind stand-ins (modules already imported are
    left alone). Returns the names deferred."""
    done = []
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        module = _Deferred(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        done.append(name)
    return done


def loaded(name: str) -> bool:
    """Whether module ``name`` has really been imported (a stand-in not yet touched has not)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)
