"""Baseline merge kernels: seeded randomness, magnitude / DARE / breadcrumbs sparsification, TIES.

Each kernel is checked against a direct element-by-element implementation on small tensors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergeengine.kernels.rng import derive_seed, tensor_generator
from mergeengine.kernels.sparsify import breadcrumbs, dare, magnitude_prune, threshold_prune
from mergeengine.kernels.ties import disjoint_mean, elect_sign, ties_merge, ties_trim


def rank_order(x: torch.Tensor) -> list[int]:
    """Flat indices by magnitude descending, then index ascending (the documented tie rule)."""
    flat = x.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))


def keep_only(x: torch.Tensor, indices: list[int]) -> torch.Tensor:
    out = torch.zeros(x.numel())
    out[indices] = x.reshape(-1)[indices]
    return out.view(x.shape)


def ties_values(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (8, 6), generator=g).float() / 2  # many ties and zeros


# -- random --------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_order_independent() -> None:
    def draw(name: str) -> torch.Tensor:
        return torch.rand(5, generator=tensor_generator(7, "step", name))

    first = [draw(name) for name in ["a", "b", "c"]]
    second = [draw(name) for name in ["c", "b", "a"]][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(draw("a"), torch.rand(5, generator=tensor_generator(8, "step", "a")))
    assert not torch.equal(draw("a"), torch.rand(5, generator=tensor_generator(7, "other", "a")))


def test_derive_seed_is_stable_and_unambiguous() -> None:
    # A pinned value: changing the hashing would silently change every recipe's randomness.
    assert derive_seed(0, "s", "t") == derive_seed(0, "s", "t")
    assert derive_seed(42, "merge", "w") == 8304378719145426062
    assert derive_seed(1, "a.b", "c") != derive_seed(1, "a", "b.c")
    assert 0 <= derive_seed(-(2**80), "é", "") < 2**63
    with pytest.raises(TypeError):
        derive_seed(1.5, "s", "t")  # type: ignore[arg-type]


# -- magnitude pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 0.5, 0.73, 1.0])
def test_magnitude_prune_matches_direct(density: float) -> None:
    x = ties_values(0)
    k = math.floor(density * x.numel() + 0.5)
    expected = keep_only(x, rank_order(x)[:k])
    got = magnitude_prune(x, density)
    assert torch.equal(got, expected)
    assert int((got != 0).sum()) <= k and got.dtype == torch.float32
    assert torch.equal(ties_trim(x, density), got)


def test_magnitude_prune_does_not_modify_input_and_handles_bf16() -> None:
    x = torch.tensor([1.0, -4.0, 2.0], dtype=torch.bfloat16)
    before = x.clone()
    assert magnitude_prune(x, 0.34).tolist() == [0.0, -4.0, 0.0]
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(), (1,), (0,), (1, 1), (3,)])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_tiny_tensors_do_not_crash(shape: tuple[int, ...], density: float) -> None:
    x = torch.full(shape, -2.0)
    g = tensor_generator(0, "s", "t")
    for out in [
        magnitude_prune(x, density),
        dare(x, density, "per_element", generator=g),
        dare(x, density, "l1", generator=g),
        dare(x, density, "none", generator=g),
        breadcrumbs(x, density, 0.0),
        breadcrumbs(x, density, 0.5),
        ties_trim(x, density),
        threshold_prune(x, 1.0),
        ties_merge([x, x], [1.0, 2.0]),
    ]:
        assert out.shape == x.shape and out.dtype == torch.float32
        assert not out.isnan().any()


def test_bad_fractions_are_rejected() -> None:
    x = torch.ones(4)
    g = tensor_generator(0, "s", "t")
    for call in [
        lambda: magnitude_prune(x, 1.5),
        lambda: dare(x, -0.1, generator=g),
        lambda: dare(x, 0.5, "l2", generator=g),  # type: ignore[arg-type]
        lambda: breadcrumbs(x, 0.5, math.nan),
        lambda: threshold_prune(x, -1.0),
    ]:
        with pytest.raises(ValueError):
            call()


# -- DARE ----------------------------------------------------------------------------------------


def test_dare_kept_fraction_is_density() -> None:
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    for density in [0.1, 0.5, 0.9]:
        out = dare(x, density, "none", generator=tensor_generator(3, "dare", f"t{density}"))
        kept = (out != 0).float().mean().item()
        sigma = math.sqrt(density * (1 - density) / x.numel())
        assert abs(kept - density) < 5 * sigma
        assert torch.equal(out[out != 0], x[out != 0])  # survivors unchanged


def test_dare_rescales_and_is_reproducible() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    density = 0.3
    u = torch.rand(x.shape, generator=tensor_generator(5, "s", "w"))
    survive = u < density  # the documented draw
    per_element = dare(x, density, generator=tensor_generator(5, "s", "w"))
    assert torch.equal(per_element, torch.where(survive, x / density, torch.zeros(())))
    l1 = dare(x, density, "l1", generator=tensor_generator(5, "s", "w"))
    assert torch.equal(l1 != 0, survive)
    assert l1.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    ratio = (l1[survive] / x[survive]).unique()
    assert torch.allclose(ratio, ratio[0])  # one common factor
    none = dare(x, density, "none", generator=tensor_generator(5, "s", "w"))
    assert torch.equal(none, torch.where(survive, x, torch.zeros(())))
    assert torch.equal(dare(x, density, generator=tensor_generator(5, "s", "w")), per_element)


def test_dare_edge_densities() -> None:
    x = torch.randn(50)
    assert torch.equal(dare(x, 1.0, generator=tensor_generator(0, "s", "t")), x)
    assert torch.equal(dare(x, 1.0, "l1", generator=tensor_generator(0, "s", "t")), x)
    for rescale in ["per_element", "l1", "none"]:
        assert not dare(x, 0.0, rescale, generator=tensor_generator(0, "s", "t")).any()  # type: ignore[arg-type]
    assert not dare(torch.zeros(10), 0.5, "l1", generator=tensor_generator(0, "s", "t")).any()


# -- breadcrumbs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.5, 0.0), (0.2, 0.1), (0.5, 0.25), (0.9, 0.3), (0.0, 0.5), (1.0, 0.0), (0.3, 1.0)],
)
def test_breadcrumbs_matches_direct(density: float, gamma: float) -> None:
    x = ties_values(1)
    n = x.numel()
    n_top = math.floor(gamma * n + 0.5)
    n_keep = math.floor(density * n + 0.5)
    expected = keep_only(x, rank_order(x)[n_top : min(n, n_top + n_keep)])
    assert torch.equal(breadcrumbs(x, density, gamma), expected)


def test_breadcrumbs_gamma_zero_is_magnitude_prune() -> None:
    x = torch.randn(30, 20)
    out = breadcrumbs(x, 0.2, 0.0)
    assert int((out != 0).sum()) == 120  # mergekit zeroes everything here
    assert torch.equal(out, magnitude_prune(x, 0.2))


# -- TIES ----------------------------------------------------------------------------------------


def direct_ties(
    deltas: list[torch.Tensor], weights: list[float], vote: str, normalize: bool = True
) -> torch.Tensor:
    """Entry by entry, in float64, straight from the definition."""
    flats = [d.reshape(-1).double().tolist() for d in deltas]
    out = []
    for values in zip(*flats, strict=True):
        voters = [w * v for w, v in zip(weights, values, strict=True)] if vote == "weighted" else values
        total = sum(voters)
        sign = (total > 0) - (total < 0)
        agree = [i for i, v in enumerate(values) if sign != 0 and v != 0 and (v > 0) == (sign > 0)]
        numerator = sum(weights[i] * values[i] for i in agree)
        denominator = sum(weights[i] for i in agree) if normalize else 1.0
        out.append(numerator / denominator if denominator != 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(deltas[0].shape)


@pytest.mark.parametrize(
    ("vote", "normalize"), list(itertools.product(["unweighted", "weighted"], [True, False]))
)
@pytest.mark.parametrize("seed", range(3))
def test_ties_merge_matches_direct(vote: str, normalize: bool, seed: int) -> None:
    deltas = [ties_trim(ties_values(seed * 10 + i), 0.6) for i in range(3)]
    weights = [1.0, 0.5, 2.0]
    got = ties_merge(deltas, weights, vote, normalize)  # type: ignore[arg-type]
    assert torch.allclose(got.double(), direct_ties(deltas, weights, vote, normalize), atol=1e-6)
    assert not got.isnan().any()


def test_sign_election_ties_at_zero_give_zero() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([-1.0, 2.0, 0.0, -1.0])
    assert elect_sign([a, b]).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert ties_merge([a, b], [1.0, 1.0]).tolist() == [0.0, 0.0, 0.0, 3.0]
    # weighted: 1*1 + 3*(-1) < 0 at entry 3, so b wins there
    assert elect_sign([a, b], [1.0, 3.0]).tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert ties_merge([a, b], [1.0, 3.0], "weighted").tolist() == [-1.0, 2.0, 0.0, 0.0]


def test_weights_enter_vote_only_when_weighted() -> None:
    a = torch.tensor([2.0])
    b = torch.tensor([-1.0])
    assert ties_merge([a, b], [1.0, 4.0], "unweighted").item() == 2.0  # sum 1 > 0: a wins
    assert ties_merge([a, b], [1.0, 4.0], "weighted").item() == -1.0  # 2 - 4 < 0: b wins


def test_disjoint_mean_weighted_and_all_zero_columns() -> None:
    a = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    sign = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # elected +1 on an all-zero entry: still 0
    out = disjoint_mean([a, b], [1.0, 3.0], sign)
    assert out.tolist() == [[(1 + 9) / 4, 0.0], [4.0, 0.0]]
    assert disjoint_mean([a, b], [0.0, 0.0], sign).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert ties_merge([torch.zeros(3), torch.zeros(3)], [1.0, 1.0]).tolist() == [0.0, 0.0, 0.0]


def test_ties_weight_scale_cancels_and_single_delta_is_identity() -> None:
    deltas = [ties_values(1), ties_values(2)]
    assert torch.equal(ties_merge(deltas, [2.0, 2.0]), ties_merge(deltas, [1.0, 1.0]))
    assert torch.equal(ties_merge(deltas[:1], [0.7]), deltas[0])


def test_ties_rejects_bad_input() -> None:
    x = torch.ones(3)
    for call in [
        lambda: ties_merge([], []),
        lambda: ties_merge([x], [1.0, 2.0]),
        lambda: ties_merge([x, torch.ones(4)], [1.0, 1.0]),
        lambda: ties_merge([x, x], [1.0, -1.0]),
        lambda: ties_merge([x, x], [1.0, math.inf]),
        lambda: ties_merge([x], [1.0], "majority"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("vote", ["unweighted", "weighted"])
def test_ties_merge_into_is_bit_identical_to_ties_merge(vote, count):
    """The in-place chunk kernel (sum of w|D| times the sign) gives exactly ties_merge's floats."""
    from mergeengine.kernels.ties import ties_merge, ties_merge_into

    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-40, 3, (10_000,), generator=g) for _ in range(3)]
    for d in deltas:
        d[torch.rand(10_000, generator=g) < 0.5] = 0.0  # trimmed: many zeros, entries where nothing agrees
    deltas[1][:100] = -deltas[0][:100]  # exact cancellations: elected sign 0
    deltas, weights = deltas[:count], [1.0, 0.3, 2.5][:count]
    expected = ties_merge(deltas, weights, vote=vote)
    out = ties_merge_into([d.clone() for d in deltas], weights, torch.empty(10_000),
                          [torch.empty(10_000), torch.empty(10_000)], vote=vote)
    assert torch.equal(out, expected) and not torch.signbit(out[out == 0]).any()


def test_dare_l1_gives_the_same_bytes_on_any_thread_count():
    """torch splits one long float32 sum among its threads (its result changed with the count);
    the l1 norms are exact sums of per-block sums instead."""
    from mergeengine.kernels.chunking import block_sums, exact_total

    x = torch.randn(300_001, generator=torch.Generator().manual_seed(0)) * 1e-3
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(dare(x, 0.3, "l1", generator=tensor_generator(0, "s", "w")))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    exact = float(x.double().abs().sum())
    assert exact_total([block_sums(x.abs())]) == pytest.approx(exact, rel=1e-6)
    # whole blocks summed in any chunking and order give the same float
    parts = [block_sums(x[i:i + 8192].abs()) for i in range(0, x.numel(), 8192)]
    assert exact_total(parts[::-1]) == exact_total([block_sums(x.abs())])
