"""Dot products and norms whose value does not depend on torch's thread count.

A plain ``torch.dot`` or ``tensor.sum()`` splits one long float32 reduction among threads, so
its last bits change with ``torch.set_num_threads`` (and with them SLERP's coefficients and the
output bytes). Here products are summed in blocks of ``SUM_BLOCK`` entries, each block by one
thread, and the block sums are added exactly (``math.fsum``), chunk by chunk so the temporary
stays small: :func:`~mergeengine.kernels.chunking.block_sums` and
:func:`~mergeengine.kernels.chunking.exact_total` over :func:`~mergeengine.kernels.chunking.spans`.
"""

from __future__ import annotations

import math

import torch

from mergeengine.kernels.chunking import SUM_BLOCK, block_sums, exact_total, spans

#: Entries per chunk of the reductions: a multiple of ``SUM_BLOCK``, so chunked sums are the
#: whole tensor's floats; 256 KiB of float32 temporaries.
CHUNK = 16 * SUM_BLOCK


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` over all entries, as a float, reproducible across thread counts.

    Args:
        a: float32 tensor.
        b: float32 tensor with as many entries.

    Returns:
        The dot product.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    buf = torch.empty(min(CHUNK, max(fa.numel(), 1)), dtype=torch.float32, device=fa.device)
    return exact_total([block_sums(torch.mul(fa[s:e], fb[s:e], out=buf[: e - s])) for s, e in spans(fa.numel(), CHUNK)])


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a − b|`` (L2, all entries) without building ``a − b`` (see :func:`dot`)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    buf = torch.empty(min(CHUNK, max(fa.numel(), 1)), dtype=torch.float32, device=fa.device)
    parts = []
    for s, e in spans(fa.numel(), CHUNK):
        diff = torch.sub(fa[s:e], fb[s:e], out=buf[: e - s])
        parts.append(block_sums(diff.mul_(diff)))
    return math.sqrt(exact_total(parts))


class Gram:
    """All dot products ``<x_i, x_j>`` of a few tensors, accumulated chunk by chunk (chunks of a
    whole number of ``SUM_BLOCK`` entries, in order, as the engine's merge chunks are): the same
    floats as :func:`gram` on the whole tensors."""

    def __init__(self, count: int) -> None:
        self.pairs = [(i, j) for i in range(count) for j in range(i, count)]
        self.parts: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in self.pairs}
        self.count = count
        self._buf: torch.Tensor | None = None

    def add(self, chunk: list[torch.Tensor]) -> None:
        """Add one chunk of every tensor (flat, same length)."""
        n = chunk[0].numel()
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.float32, device=chunk[0].device)
        for i, j in self.pairs:
            for s, e in spans(n, CHUNK):
                self.parts[i, j].append(block_sums(torch.mul(chunk[i][s:e], chunk[j][s:e], out=self._buf[: e - s])))

    def matrix(self) -> list[list[float]]:
        """The symmetric matrix of exactly summed dot products."""
        out = [[0.0] * self.count for _ in range(self.count)]
        for (i, j), ps in self.parts.items():
            out[i][j] = out[j][i] = exact_total(ps)
        return out


def gram(tensors: list[torch.Tensor]) -> list[list[float]]:
    """All dot products ``<x_i, x_j>`` of the tensors (a symmetric matrix) in one pass over them
    (see :func:`dot`)."""
    flat = [x.reshape(-1) for x in tensors]
    acc = Gram(len(flat))
    for s, e in spans(flat[0].numel(), CHUNK):
        acc.add([x[s:e] for x in flat])
    return acc.matrix()


def norm(a: torch.Tensor) -> float:
    """The L2 norm of ``a`` over all entries (see :func:`dot`)."""
    return math.sqrt(dot(a, a))


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_r, b_r>`` for every row ``r`` (the last dimension), as a float64 tensor of ``a.shape[:-1]``.

    Rows are summed by one thread each; a single row goes through :func:`dot`.
    """
    if a.dim() <= 1:
        return torch.tensor(dot(a, b), dtype=torch.float64)
    fa, fb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(2, CHUNK // max(fa.shape[1], 1))
    out = torch.empty(fa.shape[0], dtype=torch.float64, device=fa.device)
    for start, end in spans(fa.shape[0], rows):  # spans of rows
        if end - start == 1:  # a one-row sum is one long reduction: split among threads
            out[start] = dot(fa[start], fb[start])
        else:
            out[start:end] = (fa[start:end] * fb[start:end]).sum(dim=1, dtype=torch.float64)
    return out.view(a.shape[:-1])


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a[:, c], b[:, c]>`` for every column ``c`` of 2-D ``a`` and ``b``, as float64 (see :func:`row_dots`).

    Summed over blocks of rows, one thread per column, the blocks' sums added in row order.
    """
    if a.shape[1] == 1:
        return torch.tensor([dot(a, b)], dtype=torch.float64)
    out = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    rows = max(1, CHUNK // max(a.shape[1], 1))
    for start, end in spans(a.shape[0], rows):  # spans of rows
        out += (a[start:end] * b[start:end]).sum(dim=0, dtype=torch.float64)
    return out
