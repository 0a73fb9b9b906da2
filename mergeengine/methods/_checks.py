"""Input-count checks shared by the methods that take a fixed number of models."""

from mergeengine.errors import ExecutionError


def expect_inputs(method: str, inputs: list, count: int) -> None:
    """Raise a one-line error unless ``inputs`` holds exactly ``count`` tensors."""
    if len(inputs) != count:
        noun = "input" if count == 1 else "inputs"
        raise ExecutionError(f"{method} merges exactly {count} {noun} (besides the base), got {len(inputs)}")


def expect_at_least(method: str, inputs: list, count: int) -> None:
    """Raise a one-line error unless ``inputs`` holds at least ``count`` tensors."""
    if len(inputs) < count:
        raise ExecutionError(f"{method} needs at least {count} inputs (besides the base), got {len(inputs)}")
