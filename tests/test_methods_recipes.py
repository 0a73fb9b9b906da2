"""The new merge methods end to end: recipes on tiny checkpoints through the public API, against the
independent references of test_methods_math (whole tensors of the loaded checkpoints)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import load_tensors, read_folder, write_recipe
from test_methods_math import (
    arcee_ref,
    input_draws,
    karcher_ref,
    magprune_ref,
    model_stock_ref,
    multislerp_ref,
    nuslerp_ref,
    sce_ref,
    slerp_ref,
    ties_ref,
)

from mergeengine import api
from mergeengine.errors import NonFiniteError, RecipeError
from mergeengine.kernels.rng import tensor_generator
from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint


@pytest.fixture(scope="module")
def weights(models):
    def load(key):
        return load_tensors(models[key], as_float=True)

    return load("base32"), load("math32"), load("code32")


def run(tmp_path, models, merge: str, *, seed: int = 0, out: str = "out", loads=("base", "math", "code")):
    lines = "\n".join(f"  - {{id: {n}, op: load, model: {models[n + '32']}}}" for n in loads)
    r = write_recipe(tmp_path, f"seed: {seed}\nsteps:\n{lines}\n"
                               f"  - {{id: m, op: merge, {merge}}}\n"
                               f"  - {{id: out, op: save, input: m, path: {out}, dtype: float32}}\n")
    result = api.run_recipe(r, overwrite=True)
    assert result.plan.estimate.peak_live_bytes == result.stats.peak_live_bytes  # plan's peak is exact
    return read_folder(tmp_path / out)


def check(out, expected_of, names):
    assert set(out) == set(names)
    for n in names:
        torch.testing.assert_close(out[n], torch.as_tensor(expected_of(n), dtype=torch.float32),
                                   atol=2e-5, rtol=1e-4, msg=n)


def test_slerp_recipe(tmp_path, models, weights):
    b, m, _ = weights
    out = run(tmp_path, models, "method: slerp, base: base, inputs: [math], t: 0.3")
    check(out, lambda n: slerp_ref(0.3, b[n], m[n]), b)


def test_nuslerp_recipe_with_and_without_base(tmp_path, models, weights):
    b, m, c = weights
    out = run(tmp_path, models, "method: nuslerp, base: base, inputs: [math, code], weights: [0.6, 0.4], "
                                "nuslerp_flatten: false")
    check(out, lambda n: b[n].double() + nuslerp_ref(0.4, (m[n] - b[n]).double(), (c[n] - b[n]).double()), b)
    out = run(tmp_path, models, "method: nuslerp, inputs: [math, code], weights: [1, 3]", out="o2",
              loads=("math", "code"))
    check(out, lambda n: nuslerp_ref(0.75, m[n].double(), c[n].double(), flatten=True), b)


def test_multislerp_and_karcher_recipes(tmp_path, models, weights):
    b, m, c = weights
    out = run(tmp_path, models, "method: multislerp, base: base, inputs: [math, code], weights: [0.7, 0.3]")
    check(out, lambda n: multislerp_ref([m[n], c[n]], [0.7, 0.3], b[n]), b)
    out = run(tmp_path, models, "method: karcher, inputs: [math, code], max_iter: 5", out="o2", loads=("math", "code"))
    check(out, lambda n: karcher_ref([m[n], c[n]], max_iter=5), b)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_recipe(tmp_path, models, weights, filter_wise):
    b, m, c = weights
    out = run(tmp_path, models, f"method: model_stock, base: base, inputs: [math, code], filter_wise: {filter_wise}")
    check(out, lambda n: model_stock_ref(b[n], [m[n], c[n]], filter_wise), b)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_negative_cos_extrapolate_recipe(tmp_path, models, weights, filter_wise):
    b, m, c = weights
    out = run(tmp_path, models, f"method: model_stock, base: base, inputs: [math, code], filter_wise: {filter_wise}, "
                                "negative_cos: extrapolate")
    check(out, lambda n: model_stock_ref(b[n], [m[n], c[n]], filter_wise, negative_cos="extrapolate"), b)
    clamped = {n: model_stock_ref(b[n], [m[n], c[n]], filter_wise).float() for n in b}
    assert any(not torch.allclose(out[n], clamped[n]) for n in b)  # some tensor (or row) has a negative cosine


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_extrapolate_of_cancelling_deltas_is_a_clear_error(tmp_path, capsys, filter_wise):
    """Deltas D and -D: cos θ = -1 = -1/(N - 1), so t's denominator 1 + (N - 1) cos θ is 0."""
    from mergeengine.cli import main

    shape = LlamaShape()
    w = make_weights(shape, seed=3)
    for name, weights in (("zero", {n: torch.zeros_like(t) for n, t in w.items()}), ("plus", w),
                          ("minus", {n: -t for n, t in w.items()})):
        write_checkpoint(tmp_path / name, weights, shape, dtype=torch.float32)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {tmp_path / 'zero'}}}
          - {{id: plus, op: load, model: {tmp_path / 'plus'}}}
          - {{id: minus, op: load, model: {tmp_path / 'minus'}}}
          - {{id: m, op: merge, method: model_stock, base: base, inputs: [plus, minus], filter_wise: {filter_wise},
              negative_cos: extrapolate}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    assert main(["run", str(r), "-q", "--allow-nonfinite"]) == 1  # stopped before a NaN/Inf is computed
    (line,) = capsys.readouterr().err.strip().splitlines()
    row = "row 0: " if filter_wise else ""
    assert re.fullmatch(rf"error: step 'm': tensor '[\w.]+': model_stock: {row}the interpolation ratio is undefined: "
                        r"1 \+ \(N - 1\)·cos θ = 0 \(N = 2, cos θ = -1/1: the deltas cancel out\); "
                        r"use negative_cos: clamp", line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    r.write_text(r.read_text().replace("negative_cos: extrapolate", "negative_cos: clamp"))
    assert main(["run", str(r), "-q"]) == 0  # the default: t = 0, the base
    assert all(not t.any() for t in read_folder(tmp_path / "out").values())


def test_mergekit_switches_of_della_sce_and_arcee_fusion_recipes(tmp_path, models, weights):
    b, m, c = weights
    out = run(tmp_path, models, "method: della, base: base, inputs: [math, code], density: 1, zero_vote: positive")
    check(out, lambda n: b[n].double() + ties_ref([m[n] - b[n], c[n] - b[n]], [1.0, 1.0], zero_vote="positive"), b)
    out = run(tmp_path, models, "method: sce, base: base, inputs: [math, code], select_topk: 0.5, zero_vote: positive",
              out="o2")
    check(out, lambda n: sce_ref(b[n], [m[n], c[n]], 0.5, zero_vote="positive"), b)
    out = run(tmp_path, models, "method: arcee_fusion, base: base, inputs: [math], kl_dtype: float32", out="o3")
    check(out, lambda n: arcee_ref(b[n], m[n], kl_dtype=torch.float32), b)


def della_expected(b, m, c, seed, density, epsilon, weights, rescale):
    def expected(n):
        deltas = [m[n] - b[n], c[n] - b[n]]
        draws = input_draws(tensor_generator(seed, "m", n), b[n].shape, len(deltas))
        pruned = [magprune_ref(d, p, epsilon, u, rescale) for d, p, u in zip(deltas, density, draws)]
        return b[n].double() + ties_ref(pruned, weights)
    return expected


def test_della_recipe_uses_the_per_tensor_generator(tmp_path, models, weights):
    b, m, c = weights
    out = run(tmp_path, models, "method: della, base: base, inputs: [math, code], density: [0.4, 0.6], "
                                "epsilon: 0.1, weights: [1.0, 0.5]", seed=7)
    check(out, della_expected(b, m, c, 7, [0.4, 0.6], 0.1, [1.0, 0.5], "per_element"), b)


def test_della_bytes_do_not_depend_on_runs_or_threads(tmp_path, models):
    merge = "method: della, base: base, inputs: [math, code], density: 0.5, epsilon: 0.2"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(tmp_path, models, merge, out="t1")
        torch.set_num_threads(2)
        two = run(tmp_path, models, merge, out="t2")
        again = run(tmp_path, models, merge, out="t3")
    finally:
        torch.set_num_threads(before)
    for n in one:
        assert torch.equal(one[n], two[n]) and torch.equal(two[n], again[n]), n
    other_seed = run(tmp_path, models, merge, out="t4", seed=1)
    assert any(not torch.equal(one[n], other_seed[n]) for n in one)


def test_breadcrumbs_ties_and_sce_recipes(tmp_path, models, weights):
    from test_methods_math import band_ref

    b, m, c = weights
    out = run(tmp_path, models, "method: breadcrumbs_ties, base: base, inputs: [math, code], density: 0.3, "
                                "gamma: [0.01, 0.0], lambda: 0.9")
    check(out, lambda n: b[n].double() + 0.9 * ties_ref([band_ref(m[n] - b[n], 0.3, 0.01),
                                                         band_ref(c[n] - b[n], 0.3, 0.0)], [1.0, 1.0]), b)
    out = run(tmp_path, models, "method: sce, base: base, inputs: [math, code], select_topk: 0.5", out="o2")
    check(out, lambda n: sce_ref(b[n], [m[n], c[n]], 0.5), b)


def test_nearswap_passthrough_and_arcee_fusion_recipes(tmp_path, models, weights):
    b, m, _ = weights
    out = run(tmp_path, models, "method: nearswap, base: base, inputs: [math], t: 0.01")

    def near(n):
        w = (0.01 / (b[n] - m[n]).abs().clamp(min=1e-6)).clamp(0, 1)
        return w * m[n] + (1 - w) * b[n]
    check(out, near, b)
    out = run(tmp_path, models, "method: passthrough, inputs: [math], scale: 0.5", out="o2", loads=("math",))
    check(out, lambda n: 0.5 * m[n], b)
    out = run(tmp_path, models, "method: arcee_fusion, base: base, inputs: [math]", out="o3")
    check(out, lambda n: arcee_ref(b[n], m[n]), b)


@pytest.mark.parametrize("merge", [
    "method: slerp, base: base, inputs: [bad], t: 0.5",
    "method: model_stock, base: base, inputs: [bad, math]",
    "method: della, base: base, inputs: [bad, math], density: 0.5",
    "method: sce, base: base, inputs: [bad, math], select_topk: 0.5",
])
def test_nan_in_an_input_names_the_step_and_tensor(tmp_path, models, merge):
    shape = LlamaShape()
    base = make_weights(shape, seed=0)
    bad = fine_tune(base, seed=1)
    bad["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    write_checkpoint(tmp_path / "bad", bad, shape, dtype=torch.float32)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: math, op: load, model: {models['math32']}}}
          - {{id: bad, op: load, model: {tmp_path / 'bad'}}}
          - {{id: m, op: merge, {merge}}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    with pytest.raises(NonFiniteError, match=r"step 'm'.*model\.layers\.1\.mlp\.up_proj\.weight"):
        api.run_recipe(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merge,message", [
    ("method: della, base: base, inputs: [math, code], density: [0.5, 0.1], epsilon: 0.15", "density ± epsilon"),
    ("method: della, base: base, inputs: [math, code], density: 0.5, weights: [1, -1]", "weights must be >= 0"),
    ("method: breadcrumbs_ties, base: base, inputs: [math, code], density: 0.3, weights: [1, -1]", ">= 0"),
    ("method: sce, base: base, inputs: [math, code], select_topk: 1.5", "select_topk"),
    ("method: karcher, inputs: [math, code], max_iter: 0", "max_iter"),
    ("method: model_stock, base: base, inputs: [math, code], negative_cos: keep", "negative_cos"),
    ("method: arcee_fusion, base: base, inputs: [math], kl_dtype: float16", "kl_dtype"),
    ("method: sce, base: base, inputs: [math, code], zero_vote: plus", "zero_vote"),
    ("method: della, base: base, inputs: [math, code], density: 0.5, zero_vote: plus", "zero_vote"),
    ("method: slerp, base: base, inputs: [math], t: .nan", "t"),
    ("method: slerp, base: base, inputs: [math]", "t"),
    ("method: nuslerp, base: base, inputs: [math, code], weights: [1, 2, 3]", "weights has 3 entries"),
])
def test_bad_parameters_are_recipe_errors_with_a_position(tmp_path, models, merge, message):
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: math, op: load, model: {models['math32']}}}
          - {{id: code, op: load, model: {models['code32']}}}
          - {{id: m, op: merge, {merge}}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    with pytest.raises(RecipeError) as info:
        api.validate(r)
    (line,) = info.value.problems
    assert line.startswith(f"{r}:5:") and "'m'" in line and message in line, line


def test_normalize_and_int8_mask_on_ties_dare_and_breadcrumbs(tmp_path, models, weights):
    from test_methods_math import band_ref

    b, m, c = weights
    w = [1.0, 0.5]
    out = run(tmp_path, models, "method: ties, base: base, inputs: [math, code], density: 0.3, weights: [1.0, 0.5], "
                                "normalize: false", out="t")
    check(out, lambda n: b[n].double() + ties_ref([band_ref(m[n] - b[n], 0.3, 0.0), band_ref(c[n] - b[n], 0.3, 0.0)],
                                                  w, normalize=False), b)

    def dare_kept(n, i, d):
        g = tensor_generator(0, f"m/{i}", n)
        return torch.where(torch.rand(d.shape, generator=g) < 0.4, d / 0.4, 0.0)

    out = run(tmp_path, models, "method: dare_ties, base: base, inputs: [math, code], density: 0.4, weights: [1.0, 0.5], "
                                "normalize: false", out="d")
    check(out, lambda n: b[n].double() + ties_ref([dare_kept(n, 0, m[n] - b[n]), dare_kept(n, 1, c[n] - b[n])],
                                                  w, normalize=False), b)
    for method, extra in [("dare_linear", "density: 0.4"), ("breadcrumbs", "density: 0.3")]:
        merge = f"method: {method}, base: base, inputs: [math, code], weights: [1.0, 0.5], {extra}"
        plain = run(tmp_path, models, merge, out=f"{method}_plain")
        normalized = run(tmp_path, models, merge + ", normalize: true", out=f"{method}_norm")
        check(normalized, lambda n, plain=plain: b[n] + (plain[n] - b[n]) / 1.5, b)
    for method, extra in [("ties", "density: 0.3"), ("dare_ties", "density: 0.4"), ("della", "density: 0.4"),
                          ("sce", "select_topk: 0.5")]:
        merge = f"method: {method}, base: base, inputs: [math, code], {extra}"
        plain = run(tmp_path, models, merge, out=f"{method}_p")
        masked = run(tmp_path, models, merge + ", int8_mask: true", out=f"{method}_i")
        assert all(torch.equal(plain[n], masked[n]) for n in b), method


def test_slerp_per_layer_t_follows_mergekit_filters_and_gradients(tmp_path, models, weights):
    b, m, _ = weights
    out = run(tmp_path, models, "method: slerp, base: base, inputs: [math], "
                                "t: [{filter: self_attn, value: [0.2, 0.8]}, {filter: mlp, value: [1, 0.5, 0]}, {value: 0.3}]")

    def t_of(n):  # two layers: layer 0 at position 0, layer 1 at position 1
        layer = 1 if ".layers.1." in n else 0
        if "self_attn" in n:
            return [0.2, 0.8][layer]
        if "mlp" in n:
            return [1.0, 0.0][layer]
        return 0.3

    check(out, lambda n: slerp_ref(t_of(n), b[n], m[n]), b)
    gradient = run(tmp_path, models, "method: slerp, base: base, inputs: [math], t: [0, 0.5, 1]", out="g")
    check(gradient, lambda n: slerp_ref(float(".layers.1." in n) if ".layers." in n else 0.0, b[n], m[n]), b)


@pytest.mark.parametrize("merge", [
    "method: slerp, base: base, inputs: [math], t: 0.5",
    "method: model_stock, base: base, inputs: [math, code]",
    "method: della, base: base, inputs: [d_math, d_code], density: 0.4, epsilon: 0.1, rescale: l1",
    "method: sce, base: base, inputs: [d_math, d_code], select_topk: 0.5",
])
def test_streamed_methods_plan_peak_is_exact_on_bf16_models(tmp_path, models, merge):
    """The benchmark's shape of recipe: bf16 models, diffs fused into the merge, a bf16 save. The
    methods stream (their float32 work is chunk-sized scratch, outside the live values), so the
    plan's peak is exact and no larger than the read-ahead window plus a few bf16 tensors."""
    r = write_recipe(tmp_path, "seed: 0\nsteps:\n"
                     f"  - {{id: base, op: load, model: {models['base']}}}\n"
                     f"  - {{id: math, op: load, model: {models['math']}}}\n"
                     f"  - {{id: code, op: load, model: {models['code']}}}\n"
                     "  - {id: d_math, op: diff, model: math, base: base}\n"
                     "  - {id: d_code, op: diff, model: code, base: base}\n"
                     f"  - {{id: m, op: merge, {merge}}}\n"
                     "  - {id: out, op: save, input: m, path: out, dtype: bfloat16}\n")
    result = api.run_recipe(r, overwrite=True)
    assert result.plan.estimate.peak_live_bytes == result.stats.peak_live_bytes
    largest = result.plan.estimate.largest_tensor_bytes  # a bf16 tensor: the embedding
    assert result.stats.peak_live_bytes <= result.plan.prefetch_bytes + 4 * largest
    if "d_math" in merge:  # the diffs are fused: no float32 delta is stored
        assert set(result.plan.step_plans["m"].read_from) == {"d_math", "d_code"}
