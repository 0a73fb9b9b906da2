"""The one driver of merge methods: inputs as the method sees them, chunk by chunk or whole.

Every merge method gets its inputs through here. Element-wise methods are called on flat chunks
of :data:`CHUNK_NUMEL` entries held in reused float32 scratch (models turned into deltas or back,
fused diffs and amplifications computed in cache), and each chunk's result is rounded once into
the stored dtype (:class:`ChunkedResult`); other methods get whole float32 tensors. Vocabulary
padding happens before either, so no method ever sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mergeengine.errors import ExecutionError
from mergeengine.io.mapped import Cursor
from mergeengine.kernels.chunking import spans
from mergeengine.kernels.rng import tensor_generator
from mergeengine.kernels.select_sampled import sample_float32, samples_help

if TYPE_CHECKING:
    from mergeengine.methods import MergeMethod
    from mergeengine.ops.base import TaskContext

# Elements per chunk of elementwise merge work: 512 KiB of float32, so the few float32
# temporaries of a chunk stay in a core's L2 cache (1M-element chunks ran 2-3x slower here).
CHUNK_NUMEL = 1 << 17  # a multiple of chunking.SUM_BLOCK (DARE's l1 norms sum whole blocks)

#: How one recipe input becomes what the method takes: as it is, minus the base (a model given
#: to a deltas method), plus the base (a delta given to a models method), or amplified in the
#: chunk (a fused ``dpa_amplify`` of ``model - base``).
Conversion = Literal["as_is", "sub_base", "add_base", "fused"]
Fill = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def merge_chunk() -> int:
    """The current chunk size (a function so tests can shrink :data:`CHUNK_NUMEL`)."""
    return CHUNK_NUMEL


class PerChunk:
    """A prepared value that differs per chunk: ``prepare`` returns one, the method receives the
    next item of ``values`` on each chunk (in order)."""

    def __init__(self, values: Any) -> None:
        self.values = values


class ChunkedResult:
    """The output of a chunked merge: written chunk by chunk in the stored dtype, checked as it goes.

    Each chunk's float32 result is rounded once into the output (the dtype the save step stores),
    and summed while it is still in cache: a finite total proves the tensor has no NaN/Inf, so the
    executor skips its own pass over the saved tensor.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.numel = numel
        self.out = torch.empty(numel, dtype=dtype, device=device)
        self._total = torch.zeros((), dtype=torch.float32, device=device)

    def put(self, start: int, end: int, value: torch.Tensor) -> None:
        """Store the float32 result of one chunk."""
        dst = self.out[start:end]
        dst.copy_(value)
        self._total += torch.sum(dst, dtype=torch.float32)

    def finish(self, shape: torch.Size | tuple[int, ...], ctx: TaskContext) -> torch.Tensor:
        """The whole result, shaped; marks ``ctx.checked_finite`` when no NaN/Inf was seen."""
        if bool(torch.isfinite(self._total)):  # an overflowing sum only costs the executor's exact check
            ctx.checked_finite = True
        return self.out.view(shape)


@dataclass
class TensorStream:
    """One tensor's merge inputs, as the method sees them (what a ``prepare`` hook reads).

    Attributes:
        base: the base tensor (flat, stored dtype) or None.
        inputs: the recipe inputs' tensors (flat, stored dtype), in recipe order.
        conversions: how each input becomes the method's input.
        fills: amplifiers of the fused inputs, by position.
        ctx: the task (step, tensor, seed, device, statistics).
        shape: the tensor's shape (the inputs are flat), for methods whose statistics are per row.
        chunk_numel: entries per chunk (0: :func:`merge_chunk`); a method's ``chunk_numel`` hook
            sets it, e.g. to whole rows.
    """

    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    conversions: list[Conversion]
    fills: Mapping[int, Fill]
    ctx: TaskContext
    shape: tuple[int, ...] = ()
    chunk_numel: int = 0

    @property
    def step(self) -> int:
        """Entries per chunk."""
        return self.chunk_numel or merge_chunk()

    @property
    def numel(self) -> int:
        """Entries of the tensor."""
        return self.inputs[0].numel()

    @property
    def device(self) -> torch.device:
        """Where the math runs."""
        return self.inputs[0].device

    @property
    def stats(self) -> Mapping[str, Any]:
        """Results of the method's whole-model statistics (``statistics`` hook), by name."""
        return self.ctx.stats

    def buffer(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new scratch buffer of one chunk's length (slice it to the chunk); float32 by default."""
        return torch.empty(min(self.step, max(self.numel, 1)), dtype=dtype or torch.float32, device=self.device)

    def lengths(self) -> list[int]:
        """The length of every chunk, in order."""
        return [end - start for start, end in spans(self.numel, self.step)]

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor | None, list[torch.Tensor]]]:
        """``(start, end, base chunk, input chunks)`` in float32 scratch, valid until the next chunk.

        The spans of :func:`~mergeengine.kernels.chunking.spans`, like the kernels'
        :func:`~mergeengine.kernels.chunking.value_chunks`, but every input gets its own scratch
        (copied even when already float32): a method may overwrite its chunks in place, which
        must never reach the input tensors. Behind the cursor, the pages of inputs the reader
        mapped are handed back (:class:`~mergeengine.io.mapped.Cursor`): a pass holds a few MiB
        of each input, not the whole tensor, and a second pass maps them again from the page cache.
        """
        b = self.buffer() if self.base is not None else None
        ds = [self.buffer() for _ in self.inputs]
        tmp = self.buffer() if self.fills else None
        cursors = [Cursor(x) for x in ([self.base] if self.base is not None else []) + self.inputs]
        for start, end in spans(self.numel, self.step):
            n = end - start
            base = b[:n].copy_(self.base[start:end]) if b is not None else None
            chunk = [self._convert(k, start, end, base, d[:n], tmp) for k, d in enumerate(ds)]
            for cursor in cursors:
                cursor.advance(end)
            yield start, end, base, chunk

    def _convert(self, k: int, start: int, end: int, base: torch.Tensor | None, d: torch.Tensor,
                 tmp: torch.Tensor | None) -> torch.Tensor:
        x = self.inputs[k][start:end]
        conversion = self.conversions[k]
        if conversion == "fused":  # model - base, amplified
            return self.fills[k](tmp[: end - start].copy_(x).sub_(base), d)  # type: ignore[index, arg-type]
        d.copy_(x)
        if conversion == "sub_base":
            d.sub_(base)  # type: ignore[arg-type]
        elif conversion == "add_base":
            d.add_(base)  # type: ignore[arg-type]
        return d

    def samples(self) -> list[np.ndarray] | None:
        """A sample of every input as the method sees it (see
        :func:`~mergeengine.kernels.select_sampled.sample_float32`), or None where a sample does not help
        (small tensors, other devices than the CPU) or cannot be taken (fused inputs)."""
        if self.device.type != "cpu" or not samples_help(self.numel) or self.fills:
            return None
        base = sample_float32(self.base) if self.base is not None else None
        out = []
        for x, conversion in zip(self.inputs, self.conversions, strict=True):
            s = sample_float32(x)
            out.append(s - base if conversion == "sub_base" else s + base if conversion == "add_base" else s)
        return out

    def whole(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The base and the inputs as whole float32 tensors (new tensors, or the inputs themselves
        when already float32: do not modify them)."""
        base = self.base.float() if self.base is not None else None
        out = []
        for x, conversion in zip(self.inputs, self.conversions, strict=True):
            if conversion == "sub_base":
                out.append(x.float() - base)
            elif conversion == "add_base":
                out.append(x.float() + base)
            else:
                out.append(x.float())
        return base, out


def run_method(method: MergeMethod, params: Mapping[str, Any], stream: TensorStream, dtype: torch.dtype,
               shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """One output tensor of ``method``: prepared, then chunk by chunk (element-wise) or whole.

    Returns the result in ``dtype`` (floating outputs), shaped ``shape``.

    Raises:
        ExecutionError: the method returned something of the wrong size.
    """
    if method.chunk_numel is not None:
        stream = replace(stream, chunk_numel=max(1, method.chunk_numel(tuple(shape))))
    prepared = dict(method.prepare(stream, **params)) if method.prepare is not None else {}
    if method.wants_generator:
        prepared["generator"] = tensor_generator(stream.ctx.seed, stream.ctx.step, stream.ctx.tensor)
    if not method.elementwise:
        base, inputs = stream.whole()
        out = method.function(base.view(shape) if base is not None else None, [x.view(shape) for x in inputs],
                              **params, **prepared)
        _check_size(method, out, stream.numel)
        return out.reshape(shape).to(dtype)
    per_chunk = {k: iter(v.values) for k, v in prepared.items() if isinstance(v, PerChunk)}
    constants = {k: v for k, v in prepared.items() if not isinstance(v, PerChunk)}
    result = ChunkedResult(stream.numel, dtype, stream.device)
    for start, end, base, chunk in stream.chunks():
        out = method.function(base, chunk, **params, **constants, **{k: next(it) for k, it in per_chunk.items()})
        _check_size(method, out, end - start)
        result.put(start, end, out)
    return result.finish(shape, stream.ctx)


def _check_size(method: MergeMethod, out: Any, numel: int) -> None:
    if not isinstance(out, torch.Tensor) or out.numel() != numel:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExecutionError(f"merge method '{method.name}' returned {got}; expected {numel} entries")
