"""Checks shared by the methods: input counts, finite inputs."""

from __future__ import annotations

import torch

from mergeengine.errors import ExecutionError, NonFiniteError


def expect_inputs(method: str, inputs: list, count: int) -> None:
    """Raise a one-line error unless ``inputs`` holds exactly ``count`` tensors."""
    if len(inputs) != count:
        noun = "input" if count == 1 else "inputs"
        raise ExecutionError(f"{method} merges exactly {count} {noun} (besides the base), got {len(inputs)}")


def expect_at_least(method: str, inputs: list, count: int) -> None:
    """Raise a one-line error unless ``inputs`` holds at least ``count`` tensors."""
    if len(inputs) < count:
        raise ExecutionError(f"{method} needs at least {count} inputs (besides the base), got {len(inputs)}")


def require_finite(method: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Raise a one-line :class:`NonFiniteError` naming the first of the labelled tensors holding NaN/Inf.

    A method that drops entries (DELLA, SCE, TIES-like elections) or reduces a tensor to an angle
    would otherwise hide a NaN or turn it into a confusing error further on. The executor adds
    the step and the tensor name.
    """
    for label, tensor in tensors:
        if not bool(torch.isfinite(torch.sum(tensor, dtype=torch.float32))) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{method}: {label} has NaN or Inf values")


def labelled(inputs: list[torch.Tensor], base: torch.Tensor | None = None, kind: str = "input") -> list[tuple[str, torch.Tensor]]:
    """``[("the base", base), ("input 1", x_1), ...]`` for :func:`require_finite` (inputs numbered from 1)."""
    out = [("the base", base)] if base is not None else []
    return out + [(f"{kind} {i}", x) for i, x in enumerate(inputs, start=1)]
