"""How the package walks a flat tensor: one chunk iterator and one block-sum routine.

* :func:`spans` is the chunk iterator: the ``(start, end)`` bounds of consecutive chunks. Every
  chunked loop over a flat tensor uses it (the merge driver, the methods' reductions, the
  selection and DPPA kernels); callers choose the chunk length and say why.
* :func:`value_chunks` reads a delta (or the ``(model, base)`` pair it is the difference of) as
  float32 chunks for the kernels' read-only passes (DP statistics, DPA thresholds and scaling).
  The merge driver's :class:`~mergeengine.ops.chunks.TensorStream` walks the same spans but
  hands each method writable scratch per input (a method may overwrite its chunk), so it copies
  where this reader can hand out a view.
* :func:`block_sums` sums consecutive blocks of entries, each block by one thread, so a sum does
  not depend on torch's thread count or on how the tensor was chunked (at block boundaries);
  :func:`exact_total` adds the block sums exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Union

import torch

#: A delta, or the ``(model, base)`` pair it is the difference of (computed chunk by chunk).
Delta = Union["torch.Tensor", tuple["torch.Tensor", "torch.Tensor"]]  # noqa: UP007 - a string alias: no torch at import

#: Entries per chunk of :func:`value_chunks`: 512 KiB of float32 (cache-resident), and a multiple
#: of :data:`DP_SUM_BLOCK`, so DP's chunked magnitude sums are the whole tensor's floats.
CHUNK_NUMEL = 1 << 17

#: Entries per block of DARE's l1 norms and the methods' dot products (:func:`block_sums`'
#: default); chunked callers use chunks of a multiple of it.
SUM_BLOCK = 4096
#: Entries per block of DP's magnitude sums (float32 blocks, a float64 tail).
DP_SUM_BLOCK = 1 << 14


def spans(numel: int, chunk_numel: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of ``chunk_numel`` entries over ``numel`` entries.

    The last chunk may be shorter; nothing is yielded for ``numel == 0``.

    Args:
        numel: entries to cover, >= 0.
        chunk_numel: entries per chunk, >= 1.

    Returns:
        An iterator of half-open ``(start, end)`` bounds, in increasing order.

    Example:
        >>> list(spans(5, 2))
        [(0, 2), (2, 4), (4, 5)]
    """
    for start in range(0, numel, chunk_numel):
        yield start, min(start + chunk_numel, numel)


def value_chunks(delta: Delta) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, chunk)`` of the delta's float32 values, flat, chunk by chunk (:data:`CHUNK_NUMEL`).

    ``delta`` may be a ``(model, base)`` pair: each chunk is then ``model - base`` computed in a
    reused scratch buffer (the floats of ``model.float() - base``), and no delta is ever
    materialised. A float32 tensor is sliced (no copy: do not modify the chunks); other dtypes
    are converted into scratch. A chunk is only valid until the next one is requested.
    """
    pair = isinstance(delta, tuple)
    flat = (delta[0] if pair else delta).detach().reshape(-1)
    base = delta[1].detach().reshape(-1) if pair else None
    numel = flat.numel()
    scratch = torch.empty(min(numel, CHUNK_NUMEL), dtype=torch.float32, device=flat.device)
    base_scratch = torch.empty_like(scratch) if pair else None
    for start, end in spans(numel, CHUNK_NUMEL):
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


def block_sums(values: torch.Tensor, block: int = SUM_BLOCK, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sums of consecutive blocks of ``block`` entries of ``values`` (flat), as a 1-D ``dtype`` tensor.

    Whole blocks are summed in ``values``' dtype, each by one thread (one vectorised reduction
    over a ``(blocks, block)`` view), then widened exactly to ``dtype``; the last, shorter block
    is summed with a ``dtype`` accumulator. A plain ``tensor.sum()`` splits one long reduction
    among torch's threads, so its last bits change with the thread count; here they do not, and
    chunks that hold whole blocks give the whole tensor's sums. ``dtype=torch.float64`` suits a
    tensor that may be one short block (DP's module means); ``float32`` is DARE's l1 norm and the
    methods' dot products.

    Args:
        values: a float tensor (flattened).
        block: entries per block, >= 1.
        dtype: accumulator of the last, partial block and dtype of the result (None: float32).

    Returns:
        ``ceil(numel / block)`` sums; empty for an empty tensor.

    Example:
        >>> block_sums(torch.ones(10), block=4)
        tensor([4., 4., 2.])
    """
    flat = values.reshape(-1)
    dtype = dtype or torch.float32  # not a default argument: validation defers torch's import
    full = flat.numel() // block * block
    parts = [flat[:full].view(-1, block).sum(dim=1).to(dtype)] if full else []
    if full < flat.numel():
        parts.append(flat[full:].to(dtype).sum().reshape(1))
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=dtype)


def exact_total(sums: Sequence[torch.Tensor]) -> float:
    """The exactly rounded sum (``math.fsum``) of :func:`block_sums` results: independent of their
    order and of how a tensor was chunked (at block boundaries)."""
    return math.fsum(torch.cat(list(sums)).double().tolist()) if sums else 0.0
