"""Exact and sampled selection (select_exact.py, select_sampled.py) and the streaming model-wide quantile (quantile.py).

Every fast path is compared with a direct implementation: a stable sort of ``|x|`` in float64.
The histogram path is forced on small tensors by lowering ``HISTOGRAM_MIN_NUMEL``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergeengine.kernels import select_exact, select_sampled
from mergeengine.kernels.quantile import MagnitudeQuantile
from mergeengine.kernels.select_exact import (
    ChunkedTopk,
    RankSelection,
    keep_count,
    kth_smallest_abs,
    select_abs_rank,
    select_abs_ranks_streamed_many,
    topk_abs_mask,
)
from mergeengine.kernels.sparsify import threshold_prune


def select_abs_rank_streamed(chunks, numel: int, k: int) -> RankSelection:
    """The k-th smallest magnitude of one chunked tensor, by the exact streamed passes."""
    return select_abs_ranks_streamed_many(lambda: ((c,) for c in chunks()), numel, [[k]])[0][0]


def streamed_topk(chunks, numel: int, k: int) -> ChunkedTopk:
    """The top-``k`` chooser of one chunked tensor, selected by the exact streamed passes."""
    if not 0 < k < numel:
        return ChunkedTopk(None, k, numel=numel, selection=RankSelection(0, 0, 0))
    return ChunkedTopk(None, k, numel=numel, selection=select_abs_rank_streamed(chunks, numel, numel - k + 1))


def kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest ``|x|``: the k-th smallest from the other end."""
    return kth_smallest_abs(x, x.numel() - k + 1)


@pytest.fixture(params=["sort_path", "histogram_path"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per code path: small-tensor kthvalue and the two-pass radix select."""
    if request.param == "histogram_path":
        monkeypatch.setattr(select_exact, "HISTOGRAM_MIN_NUMEL", 0)
        monkeypatch.setattr(select_exact, "_CHUNK_NUMEL", 7)  # many ragged chunks on small tensors
    return request.param


def tricky(seed: int, numel: int = 600) -> torch.Tensor:
    """Random values with many exact ties, zeros, negative zeros, subnormals and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    choice = torch.randint(0, 6, (numel,), generator=g)
    pool = torch.tensor([0.0, -0.0, 0.5, -0.5, 1e-40, -3e38])  # 1e-40 is subnormal
    picks = pool[torch.randint(0, len(pool), (numel,), generator=g)]
    x = torch.where(choice < 3, picks, x)
    x[:5] = torch.tensor([-0.0, 0.0, -0.0, 0.25, -0.25])
    return x


def reference_sorted_abs(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).double().abs().sort().values


def reference_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k: magnitude descending, flat index ascending (the documented tie rule)."""
    flat = x.reshape(-1).double().abs()
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("seed", range(4))
def test_kth_smallest_abs_matches_sort_on_every_rank(path: str, seed: int) -> None:
    x = tricky(seed).view(20, 30)
    expected = reference_sorted_abs(x)
    # Every rank on the sort path; the histogram path costs ~1 ms a call, so every 13th rank.
    ranks = range(1, x.numel() + 1, 1 if path == "sort_path" else 13)
    for k in [*ranks, x.numel()]:
        got = kth_smallest_abs(x, k)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == expected[k - 1].item(), k
    assert kth_largest_abs(x, 1).item() == expected[-1].item()
    assert kth_largest_abs(x, x.numel()).item() == expected[0].item()


def test_kth_smallest_abs_same_as_torch_kthvalue_on_random(path: str) -> None:
    x = torch.randn(3, 257, generator=torch.Generator().manual_seed(9))
    for k in [1, 2, 300, 770, 771]:
        assert kth_smallest_abs(x, k) == torch.kthvalue(x.abs().flatten(), k).values


def test_negative_zero_ties_with_zero_and_tie_counts(path: str) -> None:
    x = torch.tensor([-0.0, 0.0, 1.0, -1.0, -0.0, 2.0])
    selected = select_abs_rank(x, 2)
    assert selected.value == 0.0
    assert (selected.count_less, selected.count_equal) == (0, 3)
    selected = select_abs_rank(x, 5)
    assert (selected.value, selected.count_less, selected.count_equal) == (1.0, 3, 2)


def test_non_float32_inputs_and_nan(path: str) -> None:
    x = torch.tensor([0.5, -2.0, 1.0], dtype=torch.bfloat16)
    assert kth_smallest_abs(x, 2).item() == 1.0
    with_nan = torch.tensor([float("nan"), 1.0, -float("inf"), 0.0])
    assert kth_smallest_abs(with_nan, 3).item() == math.inf  # NaN ranks above inf, like sort
    assert topk_abs_mask(with_nan, 1).tolist() == [True, False, False, False]


@pytest.mark.parametrize("k", [0, -1, 7])
def test_rank_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest_abs(torch.ones(6), k)
    if k != 0:
        with pytest.raises(ValueError, match="out of range"):
            topk_abs_mask(torch.ones(6), k)


@pytest.mark.parametrize("seed", range(3))
def test_topk_abs_mask_exact_count_and_tie_rule(path: str, seed: int) -> None:
    x = tricky(seed, 120).view(10, 12)
    for k in range(0, x.numel() + 1, 7):
        mask = topk_abs_mask(x, k)
        assert mask.shape == x.shape and mask.dtype == torch.bool
        assert int(mask.sum()) == k
        assert torch.equal(mask, reference_topk_mask(x, k)), k


def test_topk_abs_mask_is_nested(path: str) -> None:
    x = tricky(5, 200)
    previous = topk_abs_mask(x, 0)
    for k in range(1, 201, 9):
        mask = topk_abs_mask(x, k)
        assert torch.all(mask | ~previous)  # previous implies mask
        previous = mask


def test_topk_abs_mask_ties_in_a_late_chunk(path: str) -> None:
    x = torch.zeros(50)
    x[0] = 5.0
    x[40:] = 1.0  # ten ties at the threshold, all after the first chunks
    mask = topk_abs_mask(x, 4)
    assert mask.nonzero().view(-1).tolist() == [0, 40, 41, 42]


@pytest.mark.parametrize("shape", [(), (1,), (0,), (1, 1)])
def test_tiny_tensors(shape: tuple[int, ...]) -> None:
    x = torch.full(shape, -3.0)
    numel = x.numel()
    assert topk_abs_mask(x, 0).shape == x.shape and not topk_abs_mask(x, 0).any()
    assert topk_abs_mask(x, numel).all()
    if numel:
        assert kth_smallest_abs(x, 1).item() == 3.0


def test_keep_count_rounding() -> None:
    assert keep_count(10, 0.3) == 3  # int(0.3 * 10) would be 2
    assert keep_count(10, 0.25) == 3  # half rounds up
    assert keep_count(10, 0.24) == 2
    assert keep_count(7, 1.0) == 7 and keep_count(7, 0.0) == 0 and keep_count(0, 0.5) == 0
    assert keep_count(1, 0.5) == 1 and keep_count(1, 0.49) == 0
    for bad in [-0.1, 1.1, math.nan, "0.5", True]:
        with pytest.raises(ValueError):
            keep_count(10, bad)  # type: ignore[arg-type]


def test_large_tensor_histogram_path_matches_kthvalue() -> None:
    # Above HISTOGRAM_MIN_NUMEL, default chunking, bf16-like ties (few distinct values).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 400, generator=g).bfloat16().float() * 1e-3
    x[::7] = 0.0
    flat = x.abs().flatten()
    for k in [1, 17_000, 60_001, 120_000]:
        assert kth_smallest_abs(x, k) == torch.kthvalue(flat, k).values
    mask = topk_abs_mask(x, 30_000)
    assert int(mask.sum()) == 30_000
    threshold = kth_largest_abs(x, 30_000)
    assert torch.all(x.abs()[mask] >= threshold) and torch.all(x.abs()[~mask] <= threshold)


# -- model-wide quantile ------------------------------------------------------------------------


def model_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(17, 9, generator=g),
        tricky(11, 333),
        torch.zeros(40),
        torch.tensor(-0.5),
        torch.randn(5, 5, generator=g).bfloat16(),
        torch.empty(0),
    ]
    tensors[0][0, :5] = 0.5  # ties across tensors
    return tensors


def run_quantile(density: float, tensors: list[torch.Tensor]) -> float:
    quantile = MagnitudeQuantile(density)
    partials = [quantile.stage1_partial(t) for t in reversed(tensors)]  # order must not matter
    state = quantile.stage1_reduce(sum(partials), total_numel=sum(t.numel() for t in tensors))
    partials = [quantile.stage2_partial(t, state) for t in tensors]
    return quantile.stage2_reduce(sum(partials), state)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.25, 0.5, 0.77, 0.99, 1.0])
def test_model_quantile_matches_torch_on_concatenation(density: float) -> None:
    tensors = model_tensors()
    everything = torch.cat([t.float().reshape(-1) for t in tensors]).abs()
    n = everything.numel()
    k = keep_count(n, density)
    threshold = run_quantile(density, tensors)
    if k == 0:
        assert threshold == math.inf
        assert not threshold_prune(tensors[0], threshold).any()
        return
    assert threshold == torch.kthvalue(everything, n - k + 1).values.item()
    assert threshold == everything.sort(descending=True).values[k - 1].item()
    assert int((everything > threshold).sum()) < k <= int((everything >= threshold).sum())
    for t in tensors:
        values = t.float()
        expected = torch.where(values.abs() >= threshold, values, torch.zeros(()))
        assert torch.equal(threshold_prune(t, threshold), expected)
    assert MagnitudeQuantile(density).threshold(lambda: iter(tensors)) == threshold


def test_model_quantile_reduce_checks() -> None:
    quantile = MagnitudeQuantile(0.5)
    counts = quantile.stage1_partial(torch.ones(4))
    with pytest.raises(ValueError, match="missed or counted twice"):
        quantile.stage1_reduce(counts, total_numel=5)
    with pytest.raises(ValueError, match="bins"):
        quantile.stage1_reduce(torch.zeros(10, dtype=torch.int64))
    state = quantile.stage1_reduce(counts)
    assert (state.total_numel, state.keep_count, state.rank) == (4, 2, 3)
    with pytest.raises(ValueError, match="out of range"):
        quantile.stage2_reduce(torch.zeros(MagnitudeQuantile.BINS, dtype=torch.int64), state)
    with pytest.raises(ValueError):
        MagnitudeQuantile(1.5)


def test_model_quantile_of_no_entries() -> None:
    assert MagnitudeQuantile(0.5).threshold(lambda: [torch.empty(0)]) == math.inf


@pytest.mark.parametrize("numel", [5_000, 300_001])
def test_streamed_selection_equals_whole_tensor_selection(numel: int) -> None:
    """Chunks handed out in one reused buffer (as merges do) select exactly what the whole tensor does."""
    from mergeengine.kernels.select_exact import topk_abs_mask

    g = torch.Generator().manual_seed(1)
    x = torch.randn(numel, generator=g) * 1e-3
    x[::7] = 2e-3  # many exact ties
    scratch = torch.empty(4099)

    def chunks():
        for s in range(0, numel, 4099):
            part = scratch[: min(4099, numel - s)]
            part.copy_(x[s : s + 4099])
            yield part

    for k in [1, numel // 3, numel - 5, numel]:
        assert select_abs_rank_streamed(chunks, numel, k) == select_abs_rank(x, k)
    for keep in [0, numel // 7, numel // 2, numel]:
        chooser = streamed_topk(chunks, numel, keep)
        mask = torch.cat([chooser.mask(x[s : s + 4099]) for s in range(0, numel, 4099)])
        assert torch.equal(mask, topk_abs_mask(x, keep)), keep


@pytest.mark.parametrize("case", ["zeros", "specials", "ties"])
def test_streamed_selection_and_trim_on_special_values(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mostly-zero tensors (one high bin holds nearly everything: the collected low bits are
    folded into a histogram as they go), +-0, subnormals, inf and NaN, and heavy ties: the
    streamed selection equals the whole-tensor one, and ``trim_`` (a fused hardshrink where it
    can) gives the bytes of ``masked_fill(~mask)`` chunk by chunk."""
    from mergeengine.kernels.select_exact import topk_abs_mask

    monkeypatch.setattr(select_exact._LowBits, "FOLD_AT", 1000)
    g = torch.Generator().manual_seed(3)
    numel = 200_003
    x = torch.randn(numel, generator=g) * 1e-3
    if case == "zeros":
        x[torch.rand(numel, generator=g) < 0.9] = 0.0
        x[::5] = -0.0
    elif case == "specials":
        x[::11] = 1e-42  # subnormal
        x[5::13] = -0.0
        x[7::1001] = float("inf")
        x[9::2003] = float("nan")
        x[3::3001] = -float("inf")
    else:
        x = torch.round(x * 4e3) / 4e3  # a few distinct magnitudes: ties at every threshold
    step = 4099
    scratch = torch.empty(step)

    def chunks():
        for s in range(0, numel, step):
            part = scratch[: min(step, numel - s)]
            part.copy_(x[s : s + step])
            yield part

    for k in [1, 7, numel // 10, numel // 2, numel - 3, numel]:
        assert select_abs_rank_streamed(chunks, numel, k) == select_abs_rank(x, k), k
    for keep in [1, 40, numel // 10, numel // 2, numel - 100, numel - 1]:
        chooser = streamed_topk(chunks, numel, keep)
        bits, drop = torch.empty(step, dtype=torch.int32), torch.empty(step, dtype=torch.bool)
        parts = []
        for s in range(0, numel, step):
            c = x[s : s + step].clone()
            parts.append(chooser.trim_(c, bits[: c.numel()], drop[: c.numel()]))
        expected = x.masked_fill(~topk_abs_mask(x, keep), 0.0)
        got = torch.cat(parts)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (case, keep)


def _trim_all(chooser, x: torch.Tensor, step: int) -> torch.Tensor:
    """``chooser.trim_`` over ``x`` chunk by chunk (copies), concatenated."""
    bits, drop = torch.empty(step, dtype=torch.int32), torch.empty(step, dtype=torch.bool)
    parts = []
    for s in range(0, x.numel(), step):
        c = x[s : s + step].clone()
        parts.append(chooser.trim_(c, bits[: c.numel()], drop[: c.numel()]))
    return torch.cat(parts)


@pytest.mark.parametrize("magnitudes", [False, True])
@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "specials", "bad_sample", "given_up"])
def test_sampled_top_k_is_exact_and_counts_ties_per_chunk(case: str, magnitudes: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``top_k_streamed`` with samples: the window predicted by the sample settles the selection
    in one pass (checked: the window path is taken and hits), or the exact passes take over (a
    sample from another tensor misses; a window that collects far more than the sample said is
    given up). Either way the choosers trim to the bytes of ``masked_fill(~topk_abs_mask)``, and
    the per-chunk tie counts let ``trim_`` keep exactly the first tied entries in flat order.
    ``magnitudes``: the chunks come as ``|x|`` (as TIES makes them), with the same choosers."""
    from mergeengine.kernels.select_sampled import sample_float32, top_k_streamed

    monkeypatch.setattr(select_sampled, "SAMPLED_MIN_NUMEL", 0)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUNS", 64)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUN", 16)
    outcomes: list[bool] = []
    finish = select_sampled._Window.finish

    def recorded(self):  # type: ignore[no-untyped-def]
        result = finish(self)
        outcomes.append(result is not None)
        return result

    monkeypatch.setattr(select_sampled._Window, "finish", recorded)
    g = torch.Generator().manual_seed(5)
    numel, step = 150_001, 4099
    x = torch.randn(numel, generator=g) * 1e-3
    if case in ("ties", "bad_sample"):
        x = torch.round(x * 4e3) / 4e3  # a few distinct magnitudes, each a point mass of thousands
    elif case == "zeros":
        x[torch.rand(numel, generator=g) < 0.6] = 0.0
        x[::5] = -0.0
    elif case == "specials":
        x[::11] = 1e-42
        x[7::1001] = float("inf")
        x[9::2003] = float("nan")
    elif case == "given_up":  # the sample sees a spread; the tensor is one value between its quantiles
        monkeypatch.setattr(select_sampled, "SAMPLE_MAX_WINDOW", 0.05)
    y = x.clone()
    if case == "given_up":
        y[:] = torch.quantile(x[: 10_000].abs(), 0.7)
    scratch = torch.empty(step)

    def chunks():
        for s in range(0, numel, step):
            part = scratch[: min(step, numel - s)]
            part.copy_(y[s : s + step])
            yield (part.abs_() if magnitudes else part,)

    sample = sample_float32(x) * 3.0 if case == "bad_sample" else sample_float32(x)
    for keep in [1, 40, numel // 10, numel // 5, numel // 2, numel - 100, numel - 1]:
        (chooser,) = top_k_streamed(chunks, numel, [keep], [sample], magnitudes=magnitudes)
        expected = y.masked_fill(~topk_abs_mask(y, keep), 0.0)
        got = _trim_all(chooser, y, step)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (case, keep)
        assert chooser.bits == select_exact.ChunkedTopk(y, keep).bits, (case, keep)
        assert chooser.all_ties or chooser.ties_left == 0, (case, keep)  # every needed tie was kept
    if case in ("normal", "ties", "zeros", "specials"):
        assert outcomes and sum(outcomes) >= len(outcomes) - 1, outcomes  # the window usually hits
    elif case == "bad_sample":
        assert not all(outcomes), outcomes  # some miss: the exact passes gave the same bytes
    else:
        assert outcomes and not any(outcomes), outcomes


def test_sample_index_spreads_runs_over_the_tensor() -> None:
    from mergeengine.kernels.select_sampled import SAMPLE_RUN, SAMPLE_RUNS, sample_float32, sample_index

    assert torch.equal(sample_index(1000), torch.arange(1000))
    at = sample_index(10_000_019)
    assert at.numel() == SAMPLE_RUNS * SAMPLE_RUN and bool((at[1:] > at[:-1]).all())
    assert int(at[0]) == 0 and int(at[-1]) == 10_000_018
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
    at = sample_index(x.numel())
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):  # bf16 widened by bit shift
        y = x.to(dtype).reshape(1000, -1)
        assert torch.equal(torch.from_numpy(sample_float32(y)), y.reshape(-1)[at].float()), dtype
