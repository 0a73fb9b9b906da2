"""DPPA kernels: hand-worked examples of every docs/recipes.md step, and a direct (non-streaming)
implementation of docs/recipes.md that concatenates whole layers, against which the streaming passes
are compared."""

from __future__ import annotations

import math
import random
import re
import warnings

import pytest
import torch

from mergeengine.kernels.chunking import CHUNK_NUMEL
from mergeengine.kernels.dp_density import (
    DensityClampedWarning,
    DPDensities,
    ModulePartial,
    count_above,
    decoder_linear_groups,
    dp_densities,
    dp_keep_mask,
    dp_prune_tensor,
    layer_means,
    layer_outlier_counts,
    magnitude_sum,
)
from mergeengine.kernels.dpa_scale import dpa_amplify_magnitude_tensor, dpa_amplify_tensor, release_factors
from mergeengine.kernels.prune_rule import pruned_count


def module_partial(delta, module_threshold: float = 5.0) -> ModulePartial:
    """A tensor's DP statistics as the engine's passes 1 and 2 compute them (``magnitude_sum``,
    then ``count_above``); a float64 delta in float64 throughout (the reference's precision)."""
    if isinstance(delta, torch.Tensor) and delta.dtype == torch.float64:
        magnitudes = delta.detach().reshape(-1).abs()
        numel = magnitudes.numel()
        sum_abs = float(magnitudes.sum())
        outliers = count_above_exactly(magnitudes, module_threshold * sum_abs / numel) if numel else 0
        return ModulePartial(sum_abs=sum_abs, numel=numel, outlier_count=outliers)
    sum_abs, numel = magnitude_sum(delta)
    outliers = count_above(delta, [module_threshold * sum_abs / numel])[0] if numel else 0
    return ModulePartial(sum_abs=sum_abs, numel=numel, outlier_count=outliers)


def layer_outlier_partial(delta, threshold_value: float) -> int:
    """A tensor's contribution to its layer's outlier count (pass 2)."""
    return count_above(delta, [threshold_value])[0]


def count_above_exactly(values: torch.Tensor, threshold: float) -> int:
    """``count(values > threshold)`` with ``threshold`` taken exactly, not rounded to values' dtype."""
    rounded = torch.tensor(threshold, dtype=values.dtype, device=values.device)
    count = int((values > rounded).sum().item())
    if rounded.item() > threshold:  # rounded up: entries equal to it are above the true threshold
        count += int((values == rounded).sum().item())
    return count

Q0 = "model.layers.0.self_attn.q_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def hand_model() -> dict[str, torch.Tensor]:
    """2 layers x 2 modules; worked with M = L = 2, d = 0.5, lamda = 0.1 in the tests below."""
    return {
        Q0: torch.tensor([[0.5, -1.0, 1.5, -0.5], [1.0, -1.5, 1.0, 9.0]]),  # sum|D| 16, mean 2
        V0: torch.tensor([[1.0, -1.0], [1.0, 5.0]]),  # sum 8, mean 2
        Q1: torch.tensor([[2.0, -2.0, 2.0, -2.0], [2.0, 2.0, -2.0, 2.0]]),  # sum 16, mean 2
        V1: torch.tensor([[0.0, 0.0], [0.0, -12.0]]),  # sum 12, mean 3
    }


def streaming_dp(
    deltas: dict[str, torch.Tensor],
    density: float,
    lamda: float,
    module_threshold: float,
    layer_threshold: float,
) -> tuple[DPDensities, dict[str, torch.Tensor]]:
    """The three passes as the engine runs them, one tensor at a time."""
    groups = decoder_linear_groups({name: tuple(t.shape) for name, t in deltas.items()})
    partials = {name: module_partial(deltas[name], module_threshold) for name in groups}
    means = layer_means(partials, groups)
    counts = {
        name: layer_outlier_partial(deltas[name], layer_threshold * means[groups[name][0]]) for name in groups
    }
    dens = dp_densities(partials, layer_outlier_counts(counts, groups), groups, density, lamda)
    pruned = {name: dp_prune_tensor(deltas[name], dens.module_density[name]) for name in groups}
    return dens, pruned


# ---------------------------------------------------------------------------------------------
# Direct implementation of docs/recipes.md: whole layers concatenated, float64, no streaming.


def _ref_layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def _ref_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    magnitudes = delta.abs().double()
    k = math.floor(delta.numel() * (1 - density) + 1e-6)
    if k == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    return magnitudes > magnitudes.flatten().sort().values[k - 1]


def reference_dp(
    deltas: dict[str, torch.Tensor],
    density: float,
    lamda: float,
    module_threshold: float,
    layer_threshold: float,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    names = sorted((n for n, t in deltas.items() if t.dim() == 2 and "layers." in n), key=_ref_layer)
    layers = sorted({_ref_layer(n) for n in names})
    o = []
    for layer in layers:  # step 1
        a = torch.cat([deltas[n].abs().flatten().double() for n in names if _ref_layer(n) == layer])
        o.append(100.0 * (a > layer_threshold * a.mean()).sum().item() / a.numel())
    c = torch.tensor(o, dtype=torch.float64)  # step 2
    c = c - c.mean()
    c_max = c.abs().max()
    layer_d = density + (lamda * c / c_max if c_max > 1e-9 else torch.zeros_like(c))
    r = []
    for n in names:  # step 3
        a = deltas[n].abs().flatten().double()
        r.append(100.0 * (a > module_threshold * a.mean()).sum().item() / a.numel())
    r = torch.tensor(r, dtype=torch.float64)  # step 4
    numel = torch.tensor([deltas[n].numel() for n in names], dtype=torch.float64)
    if r.mean() > 0:
        r = r / r.mean()
        r = r - (numel * r).sum() / numel.sum()
        r_max = r.abs().max()
        r = lamda * r / r_max if r_max > 1e-9 else torch.zeros_like(r)
    else:
        r = torch.zeros_like(r)
    module_d = {}  # step 5
    for i, n in enumerate(names):
        module_d[n] = min(1.0, max(0.0, float(layer_d[layers.index(_ref_layer(n))] + r[i])))
    pruned = {n: torch.where(_ref_keep(deltas[n], module_d[n]), deltas[n], 0.0) for n in names}  # step 6
    return module_d, pruned


LLAMA_SHAPES = {
    "self_attn.q_proj": (16, 16),
    "self_attn.k_proj": (8, 16),
    "self_attn.v_proj": (8, 16),
    "self_attn.o_proj": (16, 16),
    "mlp.gate_proj": (24, 16),
    "mlp.up_proj": (24, 16),
    "mlp.down_proj": (16, 24),
}


def random_model(seed: int, n_layers: int = 4, shapes: dict = LLAMA_SHAPES, ties: bool = False) -> dict:
    """A tiny Llama-layout delta with a random number of planted outliers per module."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=gen),
        "lm_head.weight": torch.randn(32, 16, generator=gen),
        "model.norm.weight": torch.randn(16, generator=gen),
    }
    for layer in range(n_layers):
        deltas[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(16, generator=gen)
        for module, shape in shapes.items():
            x = torch.randn(shape, generator=gen) * 0.01
            n_out = int(torch.randint(0, x.numel() // 8, (1,), generator=gen))
            where = torch.randperm(x.numel(), generator=gen)[:n_out]
            x.view(-1)[where] = (torch.rand(n_out, generator=gen) * 0.4 + 0.1) * torch.sign(
                torch.randn(n_out, generator=gen)
            )
            if ties:
                x = torch.round(x * 200) / 200  # many equal magnitudes
            deltas[f"model.layers.{layer}.{module}.weight"] = x
    return deltas


# ---------------------------------------------------------------------------------------------
# decoder_linear_groups


def test_groups_llama_names_ordered_numerically() -> None:
    shapes = {
        "model.embed_tokens.weight": (100, 8),
        "model.layers.10.self_attn.q_proj.weight": (8, 8),
        "model.layers.10.self_attn.q_proj.bias": (8,),
        "model.layers.2.mlp.down_proj.weight": (8, 16),
        "model.layers.2.input_layernorm.weight": (8,),
        "model.layers.2.self_attn.q_proj.weight": (8, 8),
        "model.norm.weight": (8,),
        "lm_head.weight": (100, 8),
    }
    assert decoder_linear_groups(shapes) == {
        "model.layers.2.mlp.down_proj.weight": ("model.layers.2", "mlp.down_proj"),
        "model.layers.2.self_attn.q_proj.weight": ("model.layers.2", "self_attn.q_proj"),
        "model.layers.10.self_attn.q_proj.weight": ("model.layers.10", "self_attn.q_proj"),
    }
    assert list(decoder_linear_groups(shapes)) == [
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",
    ]


def test_groups_other_layouts() -> None:
    shapes = {
        "transformer.wte.weight": (100, 8),
        "transformer.wpe.weight": (64, 8),
        "transformer.h.0.ln_1.weight": (8,),
        "transformer.h.0.attn.c_attn.weight": (8, 24),
        "transformer.h.0.attn.c_attn.bias": (24,),
        "transformer.h.1.mlp.c_fc.weight": (8, 32),
        "blocks.3.ffn.w1.weight": (8, 8),
        "bert.encoder.layer.1.attention.self.query.weight": (8, 8),
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": (8, 8),
        "model.layers.0.weird.bias": (8, 8),  # a 2-D bias is still a bias
        "model.layers.0.mlp.experts.gate_up_proj": (4, 8, 8),  # 3-D: not a 2-D weight
    }
    assert decoder_linear_groups(shapes) == {
        "bert.encoder.layer.1.attention.self.query.weight": ("bert.encoder.layer.1", "attention.self.query"),
        "blocks.3.ffn.w1.weight": ("blocks.3", "ffn.w1"),
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": (
            "model.layers.0",
            "block_sparse_moe.experts.3.w1",
        ),
        "transformer.h.0.attn.c_attn.weight": ("transformer.h.0", "attn.c_attn"),
        "transformer.h.1.mlp.c_fc.weight": ("transformer.h.1", "mlp.c_fc"),
    }


# ---------------------------------------------------------------------------------------------
# Hand-worked example: M = L = 2, d = 0.5, lamda = 0.1


def test_hand_module_partials() -> None:
    # q0: |D| sums to 16 over 8 -> mean 2, M*mean = 4: only 9 is above -> r = 100 * 1/8 = 12.5
    # v0: 8/4 = 2, above 4: only 5 -> r = 25;  q1: all 2, nothing above 4 -> r = 0
    # v1: 12/4 = 3, above 6: only 12 -> r = 25
    deltas = hand_model()
    partials = {name: module_partial(deltas[name], module_threshold=2.0) for name in deltas}
    assert partials[Q0] == ModulePartial(sum_abs=16.0, numel=8, outlier_count=1)
    assert partials[V0] == ModulePartial(sum_abs=8.0, numel=4, outlier_count=1)
    assert partials[Q1] == ModulePartial(sum_abs=16.0, numel=8, outlier_count=0)
    assert partials[V1] == ModulePartial(sum_abs=12.0, numel=4, outlier_count=1)
    assert [partials[n].outlier_ratio for n in (Q0, V0, Q1, V1)] == [12.5, 25.0, 0.0, 25.0]
    assert partials[V1].mean_abs == 3.0


def test_hand_layer_means_and_counts() -> None:
    # layer 0: (16 + 8) / 12 = 2, L*mean = 4: 9 and 5 are above -> 2 outliers of 12
    # layer 1: (16 + 12) / 12 = 7/3, L*mean = 14/3: only 12 is above -> 1 of 12
    deltas = hand_model()
    groups = decoder_linear_groups({n: tuple(t.shape) for n, t in deltas.items()})
    assert list(groups.values()) == [
        ("model.layers.0", "self_attn.q_proj"),
        ("model.layers.0", "self_attn.v_proj"),
        ("model.layers.1", "self_attn.q_proj"),
        ("model.layers.1", "self_attn.v_proj"),
    ]
    partials = {name: module_partial(deltas[name], 2.0) for name in groups}
    means = layer_means(partials, groups)
    assert means == {"model.layers.0": 2.0, "model.layers.1": pytest.approx(7 / 3, abs=1e-15)}
    counts = {name: layer_outlier_partial(deltas[name], 2.0 * means[groups[name][0]]) for name in groups}
    assert counts == {Q0: 1, V0: 1, Q1: 0, V1: 1}
    assert layer_outlier_counts(counts, groups) == {"model.layers.0": 2, "model.layers.1": 1}


def test_hand_dp_densities() -> None:
    # step 1: o = [100*2/12, 100*1/12] = [16.67, 8.33]
    # step 2: mean 12.5, c = [+4.17, -4.17], c/max|c| = [1, -1] -> D = [0.5 + 0.1, 0.5 - 0.1]
    # step 3: r = [12.5, 25, 0, 25]
    # step 4: mean(r) = 15.625 -> r = [0.8, 1.6, 0, 1.6]; weighted mean (8, 4, 8, 4) = 19.2/24 = 0.8
    #         -> [0, 0.8, -0.8, 0.8] -> /0.8 -> [0, 1, -1, 1] -> *0.1 -> [0, 0.1, -0.1, 0.1]
    # step 5: d = [0.6 + 0, 0.6 + 0.1, 0.4 - 0.1, 0.4 + 0.1] = [0.6, 0.7, 0.3, 0.5]
    dens, _ = streaming_dp(hand_model(), density=0.5, lamda=0.1, module_threshold=2.0, layer_threshold=2.0)
    assert dens.layer_ratio == pytest.approx({"model.layers.0": 100 * 2 / 12, "model.layers.1": 100 / 12})
    assert dens.layer_density == pytest.approx({"model.layers.0": 0.6, "model.layers.1": 0.4})
    assert dens.module_ratio == {Q0: 12.5, V0: 25.0, Q1: 0.0, V1: 25.0}
    assert dens.module_offset == pytest.approx({Q0: 0.0, V0: 0.1, Q1: -0.1, V1: 0.1})
    assert dens.module_density == pytest.approx({Q0: 0.6, V0: 0.7, Q1: 0.3, V1: 0.5})
    assert dens.clamped == []
    # all layers hold 12 elements: the numel-weighted mean of d_lj is d
    assert (8 * 0.6 + 4 * 0.7 + 8 * 0.3 + 4 * 0.5) / 24 == pytest.approx(0.5)


def test_hand_prune() -> None:
    # q0 at 0.6: k = floor(8 * 0.4) = 3; sorted |D| = .5 .5 1 1 1 1.5 1.5 9 -> 3rd = 1; keep |D| > 1
    # v0 at 0.7: k = floor(4 * 0.3) = 1 -> 1st = 1; keep > 1: only 5
    # q1 at 0.3: k = floor(8 * 0.7) = 5 -> 5th = 2; keep > 2: nothing (ties drop everything)
    # v1 at 0.5: k = 2 -> 2nd = 0; keep > 0: only -12
    _, pruned = streaming_dp(hand_model(), density=0.5, lamda=0.1, module_threshold=2.0, layer_threshold=2.0)
    assert torch.equal(pruned[Q0], torch.tensor([[0.0, 0.0, 1.5, 0.0], [0.0, -1.5, 0.0, 9.0]]))
    assert torch.equal(pruned[V0], torch.tensor([[0.0, 0.0], [0.0, 5.0]]))
    assert torch.equal(pruned[Q1], torch.zeros(2, 4))
    assert torch.equal(pruned[V1], torch.tensor([[0.0, 0.0], [0.0, -12.0]]))


def test_one_layer_model_has_no_layer_offset() -> None:
    # only layer 0: c = [0] -> D = d. r = [12.5, 25] -> /18.75 = [2/3, 4/3];
    # weighted mean (8*2/3 + 4*4/3)/12 = 8/9 -> [-2/9, 4/9] -> /(4/9) = [-0.5, 1] -> *0.1
    deltas = {n: t for n, t in hand_model().items() if ".0." in n}
    dens, _ = streaming_dp(deltas, density=0.5, lamda=0.1, module_threshold=2.0, layer_threshold=2.0)
    assert dens.layer_density == {"model.layers.0": 0.5}
    assert dens.module_offset == pytest.approx({Q0: -0.05, V0: 0.1})
    assert dens.module_density == pytest.approx({Q0: 0.45, V0: 0.6})
    assert (8 * 0.45 + 4 * 0.6) / 12 == pytest.approx(0.5)


def test_equal_ratios_give_exactly_zero_offsets() -> None:
    # r = 100/30 everywhere and equal layer ratios: in floats, r / mean(r) - weighted mean leaves
    # ~1e-16 residues that max-normalisation turns into +-lamda; the exact arithmetic does not.
    groups = {f"model.layers.{i}.mlp.up_proj.weight": (f"model.layers.{i}", "mlp.up_proj") for i in range(3)}
    partials = {name: ModulePartial(sum_abs=3.0, numel=30, outlier_count=1) for name in groups}
    counts = {f"model.layers.{i}": 7 for i in range(3)}
    dens = dp_densities(partials, counts, groups, density=0.2, lamda=0.08)
    assert set(dens.module_offset.values()) == {0.0}
    assert set(dens.module_density.values()) == {0.2}
    assert set(dens.layer_density.values()) == {0.2}


def test_all_zero_deltas() -> None:
    zeros = torch.zeros(4, 6)
    assert module_partial(zeros) == ModulePartial(sum_abs=0.0, numel=24, outlier_count=0)
    assert layer_outlier_partial(zeros, 0.0) == 0
    assert torch.equal(dp_prune_tensor(zeros, 0.5), zeros)
    assert torch.equal(dpa_amplify_tensor(zeros, [0.1, 0.2], [2.0, 1.0]), zeros)
    # a whole model of zeros: mean(r) = 0 and all c = 0 -> every density is d
    deltas = {n: torch.zeros_like(t) for n, t in hand_model().items()}
    dens, pruned = streaming_dp(deltas, density=0.3, lamda=0.1, module_threshold=5.0, layer_threshold=3.0)
    assert set(dens.module_density.values()) == {0.3}
    assert all(torch.equal(p, torch.zeros_like(p)) for p in pruned.values())
    # one zero module among others behaves like a module without outliers
    deltas = hand_model()
    deltas[Q1] = torch.zeros(2, 4)
    dens, _ = streaming_dp(deltas, density=0.5, lamda=0.1, module_threshold=2.0, layer_threshold=2.0)
    assert dens.module_ratio[Q1] == 0.0


def test_empty_tensor_has_ratio_zero() -> None:
    part = module_partial(torch.zeros(0, 4))
    assert part == ModulePartial(sum_abs=0.0, numel=0, outlier_count=0)
    assert part.outlier_ratio == 0.0 and part.mean_abs == 0.0


def test_threshold_compared_exactly_not_rounded_to_float32() -> None:
    x = torch.tensor([0.1], dtype=torch.float32)  # 0.100000001490116...
    assert layer_outlier_partial(x, 0.1) == 1  # 0.1 rounds up to x in float32, yet x > 0.1
    assert layer_outlier_partial(x, float(x[0])) == 0
    assert layer_outlier_partial(torch.tensor([0.30000001192092896]), 0.3000000119) == 1


# ---------------------------------------------------------------------------------------------
# Clamping


def test_clamp_below_zero_warns_and_lists_modules() -> None:
    # d = 0.1, lamda = 0.3: D = [0.4, -0.2]; offsets [0, .3, -.3, .3] -> [0.4, 0.7, -0.5, 0.1]
    with pytest.warns(DensityClampedWarning, match=re.escape(Q1)) as record:
        dens, pruned = streaming_dp(
            hand_model(), density=0.1, lamda=0.3, module_threshold=2.0, layer_threshold=2.0
        )
    assert len(record) == 1 and "-0.5" in str(record[0].message)
    assert dens.clamped == [Q1]
    assert dens.module_density == pytest.approx({Q0: 0.4, V0: 0.7, Q1: 0.0, V1: 0.1})
    assert torch.equal(pruned[Q1], torch.zeros(2, 4))


def test_clamp_above_one() -> None:
    # d = 0.9, lamda = 0.3: D = [1.2, 0.6] -> [1.2, 1.5, 0.3, 0.9]
    with pytest.warns(DensityClampedWarning, match="2 module"):
        dens, pruned = streaming_dp(
            hand_model(), density=0.9, lamda=0.3, module_threshold=2.0, layer_threshold=2.0
        )
    assert dens.clamped == [Q0, V0]
    assert dens.module_density == pytest.approx({Q0: 1.0, V0: 1.0, Q1: 0.3, V1: 0.9})
    assert torch.equal(pruned[Q0], hand_model()[Q0])


def test_no_warning_without_clamping() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streaming_dp(hand_model(), density=0.5, lamda=0.1, module_threshold=2.0, layer_threshold=2.0)


# ---------------------------------------------------------------------------------------------
# Against the direct implementation


@pytest.mark.parametrize(
    ("seed", "density", "lamda", "ties"),
    [(0, 0.2, 0.08, False), (1, 0.5, 0.05, True), (2, 0.1, 0.3, False), (3, 0.9, 0.2, True)],
)
def test_streaming_matches_direct_implementation(seed: int, density: float, lamda: float, ties: bool) -> None:
    deltas = random_model(seed, ties=ties)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DensityClampedWarning)
        dens, pruned = streaming_dp(deltas, density, lamda, module_threshold=5.0, layer_threshold=3.0)
    ref_density, ref_pruned = reference_dp(deltas, density, lamda, module_threshold=5.0, layer_threshold=3.0)
    assert set(dens.module_density) == set(ref_density)
    assert len(set(dens.module_ratio.values())) > 3  # the data exercises the offsets
    for name, value in ref_density.items():
        assert dens.module_density[name] == pytest.approx(value, abs=1e-12)
        assert torch.equal(pruned[name], ref_pruned[name]), name


def test_weighted_mean_density_equals_target() -> None:
    # identical layer structure (module sizes differ inside a layer) and no clamping
    deltas = random_model(4, n_layers=5)
    dens, _ = streaming_dp(deltas, 0.3, 0.05, module_threshold=5.0, layer_threshold=3.0)
    assert dens.clamped == []
    numel = {name: deltas[name].numel() for name in dens.module_density}
    weighted = sum(numel[n] * d for n, d in dens.module_density.items()) / sum(numel.values())
    assert weighted == pytest.approx(0.3, abs=1e-12)
    assert len(set(dens.layer_density.values())) > 1
    # all modules of the same size
    same = {name: (12, 12) for name in ("a", "b", "c")}
    deltas = random_model(5, n_layers=3, shapes=same)
    dens, _ = streaming_dp(deltas, 0.2, 0.08, module_threshold=5.0, layer_threshold=3.0)
    assert sum(dens.module_density.values()) / len(dens.module_density) == pytest.approx(0.2, abs=1e-12)


def test_deterministic_and_independent_of_streaming_order() -> None:
    deltas = random_model(6)
    first, pruned_first = streaming_dp(deltas, 0.2, 0.08, 5.0, 3.0)
    second, pruned_second = streaming_dp(deltas, 0.2, 0.08, 5.0, 3.0)
    assert first == second
    assert all(torch.equal(pruned_first[n], pruned_second[n]) for n in pruned_first)
    # statistics gathered in another order give bit-identical densities
    groups = decoder_linear_groups({n: tuple(t.shape) for n, t in deltas.items()})
    names = list(groups)
    random.Random(0).shuffle(names)
    partials = {n: module_partial(deltas[n]) for n in names}
    means = layer_means(partials, groups)
    counts = {n: layer_outlier_partial(deltas[n], 3.0 * means[groups[n][0]]) for n in names}
    shuffled = dp_densities(partials, layer_outlier_counts(counts, groups), groups, 0.2, 0.08)
    assert shuffled.module_density == first.module_density


def test_dp_masks_nested_across_densities_with_ties() -> None:
    deltas = random_model(7, ties=True)
    groups = decoder_linear_groups({n: tuple(t.shape) for n, t in deltas.items()})
    partials = {n: module_partial(deltas[n]) for n in groups}
    means = layer_means(partials, groups)
    counts = layer_outlier_counts(
        {n: layer_outlier_partial(deltas[n], 3.0 * means[groups[n][0]]) for n in groups}, groups
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DensityClampedWarning)  # lamda 0.15 clamps at d = 0.1
        per_d = [dp_densities(partials, counts, groups, d, 0.15) for d in (0.1, 0.2, 0.3, 0.6)]
    assert per_d[0].clamped
    for name in groups:
        densities = [dens.module_density[name] for dens in per_d]
        assert densities == sorted(densities)
        masks = [dp_keep_mask(deltas[name], d) for d in densities]
        for narrow, wide in zip(masks, masks[1:], strict=False):
            assert not (narrow & ~wide).any(), name


# ---------------------------------------------------------------------------------------------
# Step 6 details


def test_prune_count() -> None:
    assert pruned_count(10, 0.9) == 1  # 10 * (1 - 0.9) = 0.9999999999999998
    assert pruned_count(10, 0.7) == 3
    assert pruned_count(7, 0.5) == 3
    assert pruned_count(10, 1.0) == 0
    assert pruned_count(10, 0.0) == 10
    with pytest.raises(ValueError):
        pruned_count(10, 1.5)


def test_prune_extremes_and_dtype() -> None:
    x = torch.tensor([[3.0, -1.0], [2.0, -4.0]])
    assert torch.equal(dp_prune_tensor(x, 1.0), x)
    assert torch.equal(dp_prune_tensor(x, 0.0), torch.zeros(2, 2))
    assert torch.equal(dp_prune_tensor(x, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    assert dp_prune_tensor(x.double(), 0.5).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# DPA


def test_dpa_partitions_and_scales() -> None:
    # |D| = 1..10: d=0.2 -> k=8, keep {9, 10} x2;  d=0.5 -> k=5, keep {6, 7, 8} x0.5; rest 0
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 3.5, -4.0, 18.0, -20.0])
    assert torch.equal(dpa_amplify_tensor(x, [0.2, 0.5], [2.0, 0.5]), expected)
    assert torch.equal(dpa_amplify_magnitude_tensor(x, [0.2, 0.5], [2.0, 0.5]), expected)
    # one partition with factor 1 is DP pruning
    assert torch.equal(dpa_amplify_tensor(x, [0.3], [1.0]), dp_prune_tensor(x, 0.3))
    # equal densities (clamping) leave the later partition empty
    assert torch.equal(dpa_amplify_tensor(x, [0.2, 0.2], [2.0, 5.0]), dpa_amplify_tensor(x, [0.2], [2.0]))


def test_dpa_partitions_with_ties() -> None:
    # |D| = 1 1 1 1 2 2 2 2 3 3; d=0.1: k=9, 9th=3 -> none; d=0.3: k=7, 7th=2 -> the 3s; d=0.5: k=5 -> 5th=2 -> the 3s
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, 2.0, -2.0, 2.0, 3.0, -3.0])
    out = dpa_amplify_magnitude_tensor(x, [0.1, 0.3, 0.5], [4.0, 2.0, 1.0])
    assert torch.equal(out, torch.tensor([0.0] * 8 + [6.0, -6.0]))


def test_dpa_matches_direct_partitions() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.round(torch.randn(40, 30, generator=gen) * 20) / 20  # with ties
    densities, scales = [0.05, 0.13, 0.3], [1.7, 0.4, 1.1]
    masks = [_ref_keep(x, d) for d in densities]
    expected = torch.zeros_like(x)
    previous = torch.zeros_like(x, dtype=torch.bool)
    for mask, scale in zip(masks, scales, strict=True):
        expected = torch.where(mask & ~previous, x * scale, expected)
        previous = mask
    assert torch.equal(dpa_amplify_magnitude_tensor(x, densities, scales), expected)


def test_dpa_validation() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueError):
        dpa_amplify_tensor(x, [0.2, 0.1], [1.0, 1.0])
    with pytest.raises(ValueError):
        dpa_amplify_tensor(x, [0.2], [1.0, 1.0])
    with pytest.raises(ValueError):
        dpa_amplify_tensor(x, [], [])
    with pytest.raises(ValueError):
        dpa_amplify_magnitude_tensor(x, [0.2, 0.2], [1.0, 1.0])
    with pytest.raises(ValueError):
        dpa_amplify_magnitude_tensor(x, [0.2, 1.2], [1.0, 1.0])


def test_release_factors() -> None:
    assert release_factors([1.8, 0.0]) == ([1.8, 0.0], 1.8)  # release defaults
    assert release_factors([1.0, 1.5]) == ([1.5, 1.5], 1.5)
    assert release_factors([1.0, 2.0, 0.5]) == ([2.0, 2.0, 0.5], 2.0)
    assert release_factors([0.5, 1.2, 3.0, 0.1]) == ([3.0, 3.0, 3.0, 0.1], 3.0)
    with pytest.raises(ValueError):
        release_factors([1.0, -0.5])
    with pytest.raises(ValueError):
        release_factors([])


@pytest.mark.parametrize("scales", [[1.8, 0.0], [1.0, 1.5], [0.3, 2.0, 1.2]])
def test_release_factors_reproduce_larger_magnitude_pick(scales: list[float]) -> None:
    # the release: one pruning run per partition, each scaled, merged by "larger magnitude wins"
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(20, 20, generator=gen)
    densities = [0.1, 0.2, 0.35][: len(scales)]
    runs = [dp_prune_tensor(x, d) * s for d, s in zip(densities, scales, strict=True)]
    picked = runs[0]
    for run in runs[1:]:
        picked = torch.where(run.abs() > picked.abs(), run, picked)
    factors, dense = release_factors(scales)
    assert torch.equal(dpa_amplify_tensor(x, densities, factors), picked)
    dense_runs = [x * s for s in scales]  # a tensor DP leaves dense
    assert torch.equal(torch.stack(dense_runs).abs().max(0).values, (x * dense).abs())


def test_input_validation() -> None:
    deltas = hand_model()
    groups = decoder_linear_groups({n: tuple(t.shape) for n, t in deltas.items()})
    partials = {n: module_partial(deltas[n]) for n in groups}
    counts = {"model.layers.0": 0, "model.layers.1": 0}
    with pytest.raises(ValueError, match="missing"):
        dp_densities({n: p for n, p in partials.items() if n != Q0}, counts, groups, 0.2, 0.08)
    with pytest.raises(ValueError, match="layer_counts"):
        dp_densities(partials, {"model.layers.0": 0}, groups, 0.2, 0.08)
    with pytest.raises(ValueError, match="density"):
        dp_densities(partials, counts, groups, 1.2, 0.08)
    with pytest.raises(ValueError, match="lamda"):
        dp_densities(partials, counts, groups, 0.2, -0.1)
    with pytest.raises(ValueError, match="outlier count"):
        dp_densities(partials, {"model.layers.0": 13, "model.layers.1": 0}, groups, 0.2, 0.08)


def test_chunked_statistics_and_amplify_equal_whole_tensor_formulas():
    """Tensors larger than one chunk: the chunked passes give the whole-tensor floats exactly."""

    g = torch.Generator().manual_seed(5)
    delta = torch.randn(3 * CHUNK_NUMEL + 12_345, generator=g) * 1e-3
    delta[::11] = 4e-4  # ties at thresholds
    m = delta.abs()
    part = module_partial(delta, 2.0)
    block = 1 << 14  # the whole tensor's float32 block sums and float64 tail, added in float64
    full = m.numel() // block * block
    assert part.sum_abs == float(m[:full].view(-1, block).sum(dim=1).double().sum()) + float(m[full:].double().sum())
    assert part.outlier_count == count_above_exactly(m, 2.0 * part.sum_abs / m.numel())
    assert layer_outlier_partial(delta, 1.5e-3) == int((m > 1.5e-3).sum())
    densities, scales = [0.1, 0.3], [2.0, 1.0]
    expected = torch.zeros_like(delta)
    for d, s in reversed(list(zip(densities, scales))):
        kk = pruned_count(delta.numel(), d)
        threshold = torch.kthvalue(m, kk).values
        expected = torch.where(m > threshold, delta * s, expected)
    assert torch.equal(dpa_amplify_tensor(delta, densities, scales), expected)


def test_statistics_and_amplify_on_a_model_base_pair_equal_the_materialised_delta():
    """A fused diff (model, base) in bfloat16 gives the floats of model.float() - base."""

    g = torch.Generator().manual_seed(6)
    base = (torch.randn(2 * CHUNK_NUMEL + 777, generator=g) * 0.02).bfloat16()
    model = (base.float() + torch.randn(base.shape, generator=g) * 1e-3).bfloat16()
    delta = model.float() - base
    assert module_partial((model, base), 3.0) == module_partial(delta, 3.0)
    assert layer_outlier_partial((model, base), 2e-3) == layer_outlier_partial(delta, 2e-3)
    for fn in (dpa_amplify_tensor, dpa_amplify_magnitude_tensor):
        assert torch.equal(fn((model, base), [0.1, 0.2], [1.8, 1.0]), fn(delta, [0.1, 0.2], [1.8, 1.0]))


def test_sampled_partition_thresholds_equal_the_histogram_passes(monkeypatch):
    """DPA's thresholds from sample-predicted windows (one read; forced here on a small tensor)
    give the bytes of the two histogram passes, for a delta and for a bf16 (model, base) pair,
    and the windows do settle them."""
    from mergeengine.kernels import select_sampled

    g = torch.Generator().manual_seed(8)
    base = (torch.randn(3 * CHUNK_NUMEL + 777, generator=g) * 0.02).bfloat16()
    model = (base.float() + torch.randn(base.shape, generator=g) * 1e-3).bfloat16()
    delta = model.float() - base.float()
    expected = {}
    for name, d in (("delta", delta), ("pair", (model, base))):  # small: the two histogram passes
        expected[name] = dpa_amplify_tensor(d, [0.1, 0.25], [1.8, 1.0])
    monkeypatch.setattr(select_sampled, "SAMPLED_MIN_NUMEL", 0)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUNS", 128)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUN", 16)
    settled = []
    monkeypatch.setattr(select_sampled._Window, "finish",
                        lambda self, f=select_sampled._Window.finish: settled.append(f(self) is not None) or
                        f(self))
    for name, d in (("delta", delta), ("pair", (model, base))):
        got = dpa_amplify_tensor(d, [0.1, 0.25], [1.8, 1.0])
        assert torch.equal(got.view(torch.int32), expected[name].view(torch.int32)), name
    assert len(settled) == 4 and all(settled), settled


@pytest.mark.parametrize("scales", [[1.8, 1.0], [2.0, 5.0, 0.5], [1.5, 0.0]])
def test_fused_partition_scaling_gives_the_masked_paths_bytes(scales, monkeypatch) -> None:
    """The hardshrink band sums (``_scale_bands``) equal the compare-and-mask path bit for bit,
    over several chunks, with ties, +-0, an inf (its chunk falls back) and a zero scale (no
    fused path)."""
    from mergeengine.kernels import dpa_scale

    g = torch.Generator().manual_seed(5)
    n = 3 * CHUNK_NUMEL + 123
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    model = (base.float() + torch.randn(n, generator=g) * 0.002).bfloat16()
    model[7] = base[7]  # a zero delta
    model[CHUNK_NUMEL + 5] = float("inf")
    densities = [0.1, 0.3, 0.3][: len(scales)]
    fused = dpa_amplify_tensor((model, base), densities, scales)
    monkeypatch.setattr(dpa_scale, "_bands", lambda thresholds, scales: None)
    masked = dpa_amplify_tensor((model, base), densities, scales)
    assert torch.equal(fused.view(torch.int32), masked.view(torch.int32))
