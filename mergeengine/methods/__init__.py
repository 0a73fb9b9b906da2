"""Placeholder of the merge-method API (replaced by issue-15's implementation on merge).

Only records each method's metadata on the function, so the method math can be unit-tested.
"""

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerInput(Generic[T]):
    """A per-input recipe parameter: a scalar (broadcast) or one value per input."""


def merge_method(name: str, *, inputs: str = "deltas", base: str = "required",
                 elementwise: bool = False) -> Callable[[Callable], Callable]:
    """Record the method's declaration on the function."""
    def wrap(fn: Callable) -> Callable:
        fn.merge_method = {"name": name, "inputs": inputs, "base": base, "elementwise": elementwise}
        return fn
    return wrap
