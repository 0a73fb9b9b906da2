"""The one chunk iterator and the one block-sum routine (kernels/chunking.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeengine.kernels.chunking import (
    CHUNK_NUMEL,
    DP_SUM_BLOCK,
    SUM_BLOCK,
    block_sums,
    exact_total,
    spans,
    value_chunks,
)
from mergeengine.kernels.dp_density import magnitude_sum


@pytest.mark.parametrize(("numel", "step"), [(0, 3), (1, 3), (9, 3), (10, 3), (10, 100)])
def test_spans_cover_the_range_once_in_order(numel: int, step: int) -> None:
    got = list(spans(numel, step))
    assert [i for start, end in got for i in range(start, end)] == list(range(numel))
    assert all(0 < end - start <= step for start, end in got)
    assert all(end - start == step for start, end in got[:-1])


@pytest.mark.parametrize("numel", [0, 5, SUM_BLOCK, 3 * SUM_BLOCK + 17])
def test_block_sums_are_per_block_float32_sums_with_a_dtype_tail(numel: int) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e-3
    full = numel // SUM_BLOCK * SUM_BLOCK
    sums = block_sums(x)
    assert sums.dtype == torch.float32 and sums.numel() == math.ceil(numel / SUM_BLOCK)
    for i, (start, end) in enumerate(spans(numel, SUM_BLOCK)):
        assert torch.equal(sums[i], x[start:end].sum()), i
    wide = block_sums(x, SUM_BLOCK, torch.float64)
    assert wide.dtype == torch.float64
    assert torch.equal(wide[: full // SUM_BLOCK], sums[: full // SUM_BLOCK].double())  # widened exactly
    if full < numel:
        assert torch.equal(wide[-1], x[full:].double().sum())  # the tail accumulated in float64
    assert exact_total([sums]) == math.fsum(sums.double().tolist())


def test_block_sums_of_whole_block_chunks_equal_the_whole_tensors_in_any_order() -> None:
    x = torch.randn(5 * SUM_BLOCK + 99, generator=torch.Generator().manual_seed(2))
    parts = [block_sums(x[s:e]) for s, e in spans(x.numel(), 2 * SUM_BLOCK)]
    assert torch.equal(torch.cat(parts), block_sums(x))
    assert exact_total(parts[::-1]) == exact_total([block_sums(x)])


def test_dp_magnitude_sum_is_the_whole_tensors_block_sum_for_a_delta_and_a_pair() -> None:
    """DP's sum |D| over value_chunks (whole DP_SUM_BLOCKs per chunk) is the whole tensor's
    float32 block sums plus the float64 tail, added in float64; a bf16 (model, base) pair gives
    the floats of the materialised delta."""
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(2 * CHUNK_NUMEL + 777, generator=g) * 0.02).bfloat16()
    model = (base.float() + torch.randn(base.shape, generator=g) * 1e-3).bfloat16()
    delta = model.float() - base.float()
    m = delta.abs()
    whole = m.numel() // DP_SUM_BLOCK
    sums = block_sums(m, DP_SUM_BLOCK, torch.float64)
    expected = float(sums[:whole].sum()) + float(sums[whole:].sum())
    assert magnitude_sum(delta) == (expected, delta.numel())
    assert magnitude_sum((model, base)) == (expected, delta.numel())
    assert [s for s, _ in value_chunks((model, base))] == [s for s, _ in spans(delta.numel(), CHUNK_NUMEL)]
