"""Robustness: errors that cross process boundaries, closed pipes, padded deltas, interrupted replaces."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import mergeengine
from mergeengine.errors import MergeEngineError, RecipeError


def _error_classes() -> list[type[MergeEngineError]]:
    """Every MergeEngineError subclass in the package (modules needing an absent extra are skipped)."""
    for info in pkgutil.walk_packages(mergeengine.__path__, "mergeengine."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:
            continue
    found, todo = [], [MergeEngineError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__qualname__)


def _sample(cls: type[MergeEngineError]) -> MergeEngineError:
    if issubclass(cls, RecipeError):
        return cls(["recipe.yaml:3:5: step 'm': field 'lambda': must be finite", "recipe.yaml:9:1: step 'x': unknown"])
    return cls("something broke; do this instead", step="m", tensor="lm_head.weight", file="/models/a")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_pickle(cls):
    exc = _sample(cls)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)


def test_error_classes_are_all_found():
    names = {c.__name__ for c in _error_classes()}
    assert {"RecipeError", "ModelError", "ShapeError", "NonFiniteError", "OutputError", "ExecutionError",
            "TaskFileError"} <= names


def test_convert_error_round_trips_through_pickle():
    from mergeengine.recipe.mergekit_methods import ConvertError

    back = pickle.loads(pickle.dumps(ConvertError(("models", 1, "parameters"), "unknown parameter 'x'")))
    assert (back.where, back.message) == (("models", 1, "parameters"), "unknown parameter 'x'")
