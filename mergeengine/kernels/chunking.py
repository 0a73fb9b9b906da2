"""Deltas read chunk by chunk: float32 values of ``model - base`` in reused cache-sized scratch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Union

import torch

#: A delta, or the ``(model, base)`` pair it is the difference of (computed chunk by chunk).
Delta = Union["torch.Tensor", tuple["torch.Tensor", "torch.Tensor"]]  # noqa: UP007 - a string alias: no torch at import

# Entries per chunk of the chunked passes: a multiple of the DP sums' 16384-entry blocks, and
# 512 KiB of float32 (cache-resident).
CHUNK_NUMEL = 1 << 17


def value_chunks(delta: Delta) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, chunk)`` of the delta's float32 values, flat, chunk by chunk.

    ``delta`` may be a ``(model, base)`` pair: each chunk is then ``model - base`` computed in a
    reused scratch buffer (the floats of ``model.float() - base``), and no delta is ever
    materialised. A float32 tensor is sliced (no copy); other dtypes are converted into scratch.
    A chunk is only valid until the next one is requested.
    """
    pair = isinstance(delta, tuple)
    flat = (delta[0] if pair else delta).detach().reshape(-1)
    base = delta[1].detach().reshape(-1) if pair else None
    numel = flat.numel()
    scratch = torch.empty(min(numel, CHUNK_NUMEL), dtype=torch.float32, device=flat.device)
    base_scratch = torch.empty_like(scratch) if pair else None
    for start in range(0, numel, CHUNK_NUMEL):
        end = min(start + CHUNK_NUMEL, numel)
        if base is None and flat.dtype == torch.float32:
            yield start, flat[start:end]
            continue
        out = scratch[: end - start].copy_(flat[start:end])
        if base is not None:
            b = base_scratch[: end - start]
            b.copy_(base[start:end])
            out.sub_(b)
        yield start, out


def abs_chunks(delta: Delta) -> Iterator[torch.Tensor]:
    """``|delta|`` (float32, flat) chunk by chunk, in one reused scratch buffer (see :func:`value_chunks`)."""
    scratch: torch.Tensor | None = None
    for _, chunk in value_chunks(delta):
        if scratch is None:
            scratch = torch.empty(min(delta_numel(delta), CHUNK_NUMEL), dtype=torch.float32, device=chunk.device)
        yield torch.abs(chunk, out=scratch[: chunk.numel()])


def delta_numel(delta: Delta) -> int:
    """Entries of the delta (of the model of a ``(model, base)`` pair)."""
    return delta[0].numel() if isinstance(delta, tuple) else delta.numel()

