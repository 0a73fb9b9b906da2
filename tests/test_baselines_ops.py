"""Baseline ops and merge methods end to end, against direct computations on the whole model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_tensors, read_folder, write_recipe

from mergeengine import api
from mergeengine.kernels.rng import tensor_generator
from mergeengine.tiny import LlamaShape, write_checkpoint


def load(folder):
    return load_tensors(folder, as_float=True)


@pytest.fixture(scope="module")
def tensors(models):
    b, m, c = load(models["base32"]), load(models["math32"]), load(models["code32"])
    return b, {n: m[n] - b[n] for n in b}, {n: c[n] - b[n] for n in b}


def merge(tmp_path, models, params: str, out="out", seed=0) -> dict[str, torch.Tensor]:
    r = write_recipe(tmp_path, f"""
        seed: {seed}
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: math, op: load, model: {models['math32']}}}
          - {{id: code, op: load, model: {models['code32']}}}
          - {{id: d_math, op: diff, model: math, base: base}}
          - {{id: d_code, op: diff, model: code, base: base}}
          - {{id: merged, op: merge, base: base, inputs: [d_math, d_code], {params}}}
          - {{id: out, op: save, input: merged, path: {out}}}
        """)
    api.run_recipe(r, overwrite=True)
    return read_folder(tmp_path / out)


def topk(d, density):
    k = min(d.numel(), math.floor(density * d.numel() + 0.5))
    flat = d.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    order = sorted(range(flat.numel()), key=lambda i: (-abs(flat[i].item()), i))[:k]
    keep[order] = True
    return torch.where(keep.view_as(d), d, 0.0)


def ties_direct(ds, ws, vote):
    sign = torch.sign(sum(w * d for w, d in zip(ws, ds)) if vote == "weighted" else sum(ds))
    num = sum(w * d * ((torch.sign(d) == sign) & (sign != 0)) for w, d in zip(ws, ds))
    den = sum(w * ((torch.sign(d) == sign) & (sign != 0)).float() for w, d in zip(ws, ds))
    return torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)


SMALL = ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"]


def test_ties_per_tensor_per_input_density_weighted_vote(tmp_path, models, tensors):
    out = merge(tmp_path, models, "method: ties, density: [0.2, 0.4], weights: [1.0, 2.0], vote: weighted, lambda: 0.9")
    b, dm, dc = tensors
    for n in SMALL:
        expected = b[n] + 0.9 * ties_direct([topk(dm[n], 0.2), topk(dc[n], 0.4)], [1.0, 2.0], "weighted")
        torch.testing.assert_close(out[n], expected, atol=1e-6, rtol=1e-5)


def test_ties_model_scope_uses_one_threshold_per_model(tmp_path, models, tensors):
    out = merge(tmp_path, models, "method: ties, density: 0.3, trim_scope: model")
    b, dm, dc = tensors
    trimmed = []
    for d in (dm, dc):
        allmag = torch.cat([t.abs().flatten() for t in d.values()])
        k = math.floor(0.3 * allmag.numel() + 0.5)
        thr = allmag.sort(descending=True).values[k - 1]
        trimmed.append({n: torch.where(t.abs() >= thr, t, 0.0) for n, t in d.items()})
    for n in b:
        expected = b[n] + ties_direct([trimmed[0][n], trimmed[1][n]], [1.0, 1.0], "unweighted")
        torch.testing.assert_close(out[n], expected, atol=1e-6, rtol=1e-5)
    kept = sum(int((t != 0).sum()) for t in trimmed[0].values())
    assert abs(kept / sum(t.numel() for t in dm.values()) - 0.3) < 0.01


def test_dare_linear_and_reproducibility(tmp_path, models, tensors):
    out = merge(tmp_path, models, "method: dare_linear, density: 0.5, weights: [1.0, 0.5]", seed=7)
    b, dm, dc = tensors
    for n in SMALL:
        expected = torch.zeros_like(dm[n])
        for i, (w, d) in enumerate([(1.0, dm[n]), (0.5, dc[n])]):
            keep = torch.rand(d.shape, generator=tensor_generator(7, f"merged/{i}", n)) < 0.5
            expected += w * torch.where(keep, d / 0.5, 0.0)
        torch.testing.assert_close(out[n], b[n] + expected, atol=1e-6, rtol=1e-5)
    again = merge(tmp_path, models, "method: dare_linear, density: 0.5, weights: [1.0, 0.5]", out="again", seed=7)
    assert all(torch.equal(out[n], again[n]) for n in out)
    other = merge(tmp_path, models, "method: dare_linear, density: 0.5, weights: [1.0, 0.5]", out="other", seed=8)
    assert not torch.equal(out[SMALL[0]], other[SMALL[0]])


def test_dare_ties_and_breadcrumbs(tmp_path, models, tensors):
    b, dm, dc = tensors
    out = merge(tmp_path, models, "method: dare_ties, density: 0.6, rescale: l1")
    n = SMALL[0]
    dropped = []
    for i, d in enumerate([dm[n], dc[n]]):
        keep = torch.rand(d.shape, generator=tensor_generator(0, f"merged/{i}", n)) < 0.6
        k = torch.where(keep, d, 0.0)
        dropped.append(k * (d.abs().sum() / k.abs().sum()))
    torch.testing.assert_close(out[n], b[n] + ties_direct(dropped, [1, 1], "unweighted"), atol=1e-6, rtol=1e-5)

    out = merge(tmp_path, models, "method: breadcrumbs, density: 0.3, gamma: 0.0", out="bc")
    ta = {n: b[n] + topk(dm[n], 0.3) + topk(dc[n], 0.3) for n in SMALL}
    for n in SMALL:  # gamma 0 keeps the top-density entries (mergekit zeroes everything here)
        torch.testing.assert_close(out[n], ta[n], atol=1e-6, rtol=1e-5)


def test_dare_op_subset_of_tensors_gives_same_values(tmp_path, models, tensors):
    b, dm, _ = tensors
    shape = LlamaShape()
    subset = {n: load(models["math32"])[n] for n in SMALL}
    write_checkpoint(tmp_path / "sub_ft", subset, shape)
    write_checkpoint(tmp_path / "sub_base", {n: b[n] for n in SMALL}, shape)

    def run(base, ft, out):
        r = write_recipe(tmp_path, f"""
            seed: 5
            steps:
              - {{id: base, op: load, model: {base}}}
              - {{id: ft, op: load, model: {ft}}}
              - {{id: d, op: diff, model: ft, base: base}}
              - {{id: r, op: dare, input: d, density: 0.3}}
              - {{id: out, op: save, input: r, path: {out}}}
            """, name=f"{out}.yaml")
        api.run_recipe(r)
        return read_folder(tmp_path / out)

    full = run(models["base32"], models["math32"], "full")
    part = run(tmp_path / "sub_base", tmp_path / "sub_ft", "part")
    for n in SMALL:
        assert torch.equal(full[n], part[n])
    big = "model.layers.1.mlp.up_proj.weight"
    kept = (full[big] - b[big] != 0).float().mean().item()
    assert 0.25 < kept < 0.35
    nz = (full[big] - b[big]) != 0
    torch.testing.assert_close((full[big] - b[big])[nz], dm[big][nz] / 0.3, atol=1e-6, rtol=1e-4)


def test_magnitude_prune_scope(tmp_path, models, tensors):
    b, dm, _ = tensors
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: ft, op: load, model: {models['math32']}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: m, op: magnitude_prune, input: d, density: 0.25, scope: decoder_linear}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    api.run_recipe(r)
    out = read_folder(tmp_path / "out")
    n = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(out[n], b[n] + topk(dm[n], 0.25), atol=1e-6, rtol=1e-5)
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb], b[emb] + dm[emb], atol=1e-6, rtol=1e-5)  # outside scope: dense


def test_tiny_tensors_do_not_crash_any_method(tmp_path):
    shape = LlamaShape(hidden_size=4, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1,
                       vocab_size=3, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in shape.tensor_shapes().items()}
    base["model.scalar"] = torch.tensor(1.0)
    ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    write_checkpoint(tmp_path / "b", base, shape)
    write_checkpoint(tmp_path / "f", ft, shape)
    for method in ["ties, density: 0.01", "ties, density: 0.01, trim_scope: model", "dare_ties, density: 0.01",
                   "dare_linear, density: 0.01", "breadcrumbs, density: 0.01, gamma: 0.5", "task_arithmetic"]:
        r = write_recipe(tmp_path, f"""
            steps:
              - {{id: base, op: load, model: ./b}}
              - {{id: ft, op: load, model: ./f}}
              - {{id: d, op: diff, model: ft, base: base}}
              - {{id: p, op: dp_prune, input: d, density: 0.01}}
              - {{id: m, op: merge, method: {method}, base: base, inputs: [p, ft]}}
              - {{id: out, op: save, input: m, path: out}}
            """)
        api.run_recipe(r, overwrite=True)


def test_chunked_topk_equals_whole_tensor_mask_with_ties():
    from mergeengine.kernels.select_exact import ChunkedTopk, topk_abs_mask

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (70_001,), generator=g).float()  # heavy ties, zeros
    for k in [0, 1, 5000, 40_000, 70_001]:
        chooser = ChunkedTopk(x, k)
        chunks = [chooser.mask(x[s:s + 997]) for s in range(0, x.numel(), 997)]
        assert torch.equal(torch.cat(chunks), topk_abs_mask(x, k)), k


def test_chunked_ties_equals_whole_tensor_ties(tmp_path, models, tensors, monkeypatch):
    from mergeengine.ops import chunks as merge_op

    whole = merge(tmp_path, models, "method: ties, density: [0.2, 0.5], vote: weighted, weights: [1, 3]", out="whole")
    monkeypatch.setattr(merge_op, "CHUNK_NUMEL", 333)
    chunked = merge(tmp_path, models, "method: ties, density: [0.2, 0.5], vote: weighted, weights: [1, 3]",
                    out="chunked")
    from mergeengine.kernels import select_sampled  # the sampled window (one selection pass) on every tensor

    monkeypatch.setattr(select_sampled, "SAMPLED_MIN_NUMEL", 0)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUNS", 16)
    monkeypatch.setattr(select_sampled, "SAMPLE_RUN", 8)
    monkeypatch.setattr(select_sampled, "SAMPLE_MAX_WINDOW", 1.0)  # tiny tensors: the margin is most of the sample
    windows = []
    monkeypatch.setattr(select_sampled._Window, "finish", lambda self, f=select_sampled._Window.finish: windows.append(f(self))
                        or windows[-1])
    sampled = merge(tmp_path, models, "method: ties, density: [0.2, 0.5], vote: weighted, weights: [1, 3]",
                    out="sampled")
    assert sum(w is not None for w in windows) > len(windows) // 2, windows  # most windows hit
    b, dm, dc = tensors
    for n in whole:
        assert torch.equal(whole[n], chunked[n]), n
        assert torch.equal(whole[n], sampled[n]), n
    n = "model.layers.1.mlp.down_proj.weight"
    expected = b[n] + ties_direct([topk(dm[n], 0.2), topk(dc[n], 0.5)], [1.0, 3.0], "weighted")
    torch.testing.assert_close(chunked[n], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params", ["method: dare_ties, density: [0.3, 0.6], rescale: l1",
                                    "method: dare_linear, density: 0.4, weights: [1, 2]"])
def test_chunked_dare_equals_whole_tensor_draws(tmp_path, models, tensors, monkeypatch, params):
    """Sequential chunk draws from one generator equal one whole-tensor draw (guards torch's RNG)."""
    from mergeengine.ops import chunks as merge_op

    whole = merge(tmp_path, models, params, out="whole")
    monkeypatch.setattr(merge_op, "CHUNK_NUMEL", 4096)
    chunked = merge(tmp_path, models, params, out="chunked")
    for n in whole:  # l1 norms are exact sums of the same block sums: the same bytes
        assert torch.equal(whole[n], chunked[n]), n


@pytest.mark.parametrize("params", ["method: dare_ties, density: [0.3, 0.6], rescale: l1",
                                    "method: dare_ties, density: 0.5, vote: weighted, weights: [1, 3]",
                                    "method: dare_linear, density: 0.4, weights: [1, 2], lambda: 0.8"])
def test_dare_numpy_masks_give_the_torch_paths_bytes(tmp_path, models, params, monkeypatch):
    """On the CPU the survivors are drawn and applied with numpy (a dropped entry keeps its sign
    as a zero); the merged bytes equal the masked-fill path's."""
    from mergeengine.kernels import survivors as dare_op
    from mergeengine.ops import chunks as merge_op

    monkeypatch.setattr(merge_op, "CHUNK_NUMEL", 4096)
    fast = merge(tmp_path, models, params, out="numpy")
    monkeypatch.setattr(dare_op, "NUMPY_MASKS", False)
    slow = merge(tmp_path, models, params, out="torch")
    assert set(fast) == set(slow)
    for n in fast:
        assert torch.equal(fast[n].view(torch.int32) if fast[n].dtype == torch.float32 else fast[n],
                           slow[n].view(torch.int32) if slow[n].dtype == torch.float32 else slow[n]), n


def test_model_scope_trim_is_the_masked_fill_in_one_op():
    """``keep_at_least(t)`` (one hardshrink) gives the bytes of ``masked_fill_(abs() < t, 0)`` for
    thresholds 0, subnormal, ordinary, the largest float, inf and NaN, on +-0, subnormals, ties at
    the threshold, inf and NaN."""
    from mergeengine.kernels.select_exact import bits_to_float
    from mergeengine.methods.ties import keep_at_least

    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, generator=g) * 1e-3
    x[::7] = 1e-3
    x[1::7] = -1e-3
    x[2::11] = -0.0
    x[3::13] = 0.0
    x[4::17] = 1e-42
    x[5::101] = float("inf")
    x[6::103] = -float("inf")
    x[8::107] = float("nan")
    t32 = float(torch.tensor(1e-3, dtype=torch.float32))
    for t in [0.0, 1e-42, t32, bits_to_float(0x7F7FFFFF), math.inf, math.nan]:
        expected = x.clone().masked_fill_(x.abs() < t, 0.0)
        got = keep_at_least(t)(x.clone(), None, None)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), t


@pytest.mark.parametrize(("numpy", "keep_all"), [(True, False), (True, True), (False, False)])
def test_dare_survivors_drawn_ahead_are_one_whole_tensor_draw(numpy, keep_all):
    """The masks a helper thread draws one chunk ahead (two alternating slots) are those of one
    whole-tensor draw per input; stopping early leaves no drawing thread behind."""
    import threading

    from mergeengine.kernels.sparsify import dare_mask
    from mergeengine.kernels.survivors import Survivors

    cpu = torch.device("cpu")
    lengths, densities = [5000, 5000, 5000, 1234], [0.3, 0.7]

    def gens():
        return [tensor_generator(0, f"s/{i}", "w") for i in range(len(densities))]

    whole = [dare_mask((sum(lengths),), p, g, cpu) for g, p in zip(gens(), densities, strict=True)]
    chunks = [[m.clone() for m in masks]
              for masks in Survivors(gens(), densities, lengths, cpu, numpy=numpy, keep_all=keep_all)]
    assert [c[0].numel() for c in chunks] == lengths
    for i in range(len(densities)):
        assert torch.equal(torch.cat([c[i] for c in chunks]), whole[i])
    it = iter(Survivors(gens(), densities, lengths, cpu, numpy=numpy))
    next(it)
    it.close()
    assert not any(t.name.startswith("dare-draws") for t in threading.enumerate())
