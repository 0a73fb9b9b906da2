"""The new merge methods' math, tensor by tensor, against independent whole-tensor implementations.

Each reference below transcribes the method's published definition (mergekit's algorithm, step by
step, stacked and whole-tensor, in numpy or plain torch) and never calls mergeengine's code.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from mergeengine.errors import ExecutionError
from mergeengine.kernels.rng import tensor_generator
from mergeengine.methods._checks import expect_inputs
from mergeengine.methods.arcee_fusion import arcee_fusion
from mergeengine.methods.breadcrumbs_ties import breadcrumbs_ties
from mergeengine.methods.della import della, della_linear
from mergeengine.methods.karcher import karcher
from mergeengine.methods.model_stock import model_stock, stock_ratio
from mergeengine.methods.multislerp import multislerp
from mergeengine.methods.nearswap import nearswap
from mergeengine.methods.nuslerp import nuslerp
from mergeengine.methods.passthrough import passthrough
from mergeengine.methods.sce import sce
from mergeengine.methods.slerp import slerp, slerp_coefficients
from mergeengine.ops.base import TaskContext
from mergeengine.ops.chunks import TensorStream, run_method

SHAPES = [(12, 20), (33,)]


def run_whole(method, base, inputs, *, seed=0, step="m", tensor="w", **params):
    """A streamed method on whole tensors, through the engine's driver (prepare, then chunks), as
    step ``step`` merging tensor ``tensor`` with recipe seed ``seed``."""
    sig = inspect.signature(method.function)
    full = {n: p.default for n, p in sig.parameters.items()
            if p.kind == p.KEYWORD_ONLY and p.default is not p.empty and n not in method.provides}
    full.update(params)
    ctx = TaskContext(step, tensor, seed, torch.device("cpu"), {}, plan=None)
    stream = TensorStream(base.reshape(-1), [x.reshape(-1) for x in inputs], ["as_is"] * len(inputs), {}, ctx,
                          tuple(base.shape))
    return run_method(method, full, stream, torch.float32, base.shape)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def fine_tunes(shape, n, seed=0):
    base = rand(*shape, seed=seed)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=0.1) for i in range(n)]


def close(actual, expected, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- SLERP family

def slerp_ref(t, v0, v1, threshold=0.9995, eps=1e-8):
    a, b = v0.double().numpy(), v1.double().numpy()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    d = np.sum(ua * ub)
    if abs(d) > threshold:
        return (1 - t) * a + t * b
    th = np.arccos(d)
    return np.sin((1 - t) * th) / np.sin(th) * a + np.sin(t * th) / np.sin(th) * b


def slerp_tensor(base, models, t):
    """The method on a whole tensor: its coefficients (the engine's prepare pass), then the combination."""
    expect_inputs("slerp", models, 1)
    s_base, s_model = slerp_coefficients(t, base, models[0])
    return slerp.function(base, models, t=t, s_base=s_base, s_model=s_model)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(shape, t):
    base, (model,) = fine_tunes(shape, 1)
    model = model + rand(*shape, seed=9)  # a real angle
    close(slerp_tensor(base, [model], t), slerp_ref(t, base, model))


def test_slerp_identical_colinear_antipodal_and_zero():
    a = rand(5, 7)
    close(slerp_tensor(a, [a.clone()], 0.4), a)
    close(slerp_tensor(a, [2 * a], 0.25), 1.25 * a)  # colinear: linear
    close(slerp_tensor(a, [-a], 0.25), 0.5 * a)  # antipodal: linear, (1 - t) a - t a
    zero = torch.zeros(5, 7)
    close(slerp_tensor(zero, [a], 0.5), slerp_ref(0.5, zero, a))  # zero norm: cos = 0
    with pytest.raises(ExecutionError, match="exactly 1 input"):
        slerp_tensor(a, [a, a], 0.5)


def nuslerp_ref(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    lin = (1 - t) * v0 + t * v1
    res = torch.where(s.abs() < eps, lin, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(shape, flatten, row_wise):
    base, (m1, m2) = fine_tunes(shape, 2)
    w = [0.7, 0.3]
    t = 0.3
    out = nuslerp(base, [m1, m2], weights=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    expected = base.double() + nuslerp_ref(t, (m1 - base).double(), (m2 - base).double(),
                                           dim=0 if row_wise else -1, flatten=flatten)
    close(out, expected)
    no_base = nuslerp(None, [m1, m2], weights=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(no_base, nuslerp_ref(t, m1.double(), m2.double(), dim=0 if row_wise else -1, flatten=flatten))


def test_nuslerp_antipodal_rows_and_zero_weights():
    base = torch.zeros(4, 6)  # exact deltas: d and -d
    d = rand(4, 6, seed=3)
    out = nuslerp(base, [d, -d], weights=[0.5, 0.5], nuslerp_flatten=False)
    close(out, base)  # antipodal rows: linear, which cancels
    out = nuslerp(None, [d, 2 * d], weights=[0.0, 0.0])  # weights sum 0: t = 0.5, colinear: linear
    close(out, 1.5 * d)


def multislerp_ref(tensors, weight, base=None, normalize_weights=True, eps=1e-8):
    x = torch.stack(tensors).double()
    if base is not None:
        x = x - base.double()
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor(weight, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    res = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms.squeeze(-1) * w).sum()
    res = res.reshape(x.shape[1:])
    return res + base.double() if base is not None else res


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_reference(shape, with_base):
    base, models = fine_tunes(shape, 3)
    w = [0.5, 0.3, 0.2]
    b = base if with_base else None
    close(multislerp(b, models, weights=w), multislerp_ref(models, w, b))
    close(multislerp(b, models, weights=[2.0, 1.0, 1.0], normalize_weights=False),
          multislerp_ref(models, [2.0, 1.0, 1.0], b, normalize_weights=False))


def test_multislerp_identical_antipodal_and_one_input():
    a = rand(3, 8)
    close(multislerp(None, [a, a.clone()], weights=[0.4, 0.6]), a)
    close(multislerp(None, [a, -a], weights=[1.0, 1.0]), torch.zeros(3, 8))  # cancels: linear fallback
    with pytest.raises(ExecutionError, match="cancel"):
        multislerp(None, [a, -a, a, -a], weights=[1.0, 1.0, 1.0, 1.0])
    close(multislerp(None, [a], weights=[0.3]), a)
    with pytest.raises(ExecutionError, match="sum to 0"):
        multislerp(None, [a, 2 * a], weights=[1.0, -1.0])


def karcher_ref(tensors, max_iter=10, tol=1e-5):
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(t.double().norm()) for t in tensors]
    units = [t.double() / n if n > 0 else torch.zeros_like(t.double()) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = us[0].clone() if u.norm() < tol else u / u.norm()
    for _ in range(max_iter):
        T = torch.zeros_like(u)
        for ai, ui in zip(a, us):
            d = torch.clamp((u * ui).sum(), -1, 1)
            th = torch.arccos(d)
            if th < tol:
                continue
            T += ai * (th / torch.sin(th)) * (ui - d * u)
        nt = T.norm()
        if nt < tol:
            break
        u = torch.cos(nt) * u + torch.sin(nt) * (T / nt)
        if u.norm() > tol:
            u = u / u.norm()
    return sum(al * n for al, n in zip(alphas, norms)) * u


@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_matches_reference(shape):
    _, models = fine_tunes(shape, 3)
    models = [m + rand(*shape, seed=20 + i, scale=0.5) for i, m in enumerate(models)]
    close(karcher(None, models), karcher_ref(models))
    close(karcher(None, models, max_iter=2, tol=1e-3), karcher_ref(models, max_iter=2, tol=1e-3))


def test_karcher_identical_zero_and_one_input():
    a = rand(4, 4)
    close(karcher(None, [a, a.clone(), a.clone()]), a)
    zero = torch.zeros(4, 4)
    close(karcher(None, [zero, zero.clone()]), zero)
    close(karcher(None, [a, zero]), karcher_ref([a, zero]))  # the zero input only shrinks the norm
    close(karcher(None, [a]), a)


# ----------------------------------------------------------------------------- Model Stock

def model_stock_ref(w0, ws, filter_wise=False, negative_cos="clamp"):
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    off = [w.double() - w0.double() for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            prod = off[i].norm(dim=-1) * off[j].norm(dim=-1)
            cos.append(((off[i] * off[j]).sum(-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    if negative_cos == "clamp":
        c = c.clamp(min=0)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = sum(w.double() for w in ws) / n
    return (t * avg + (1 - t) * w0.double()).reshape(shape)


def model_stock_tensor(base, deltas, filter_wise=False):
    """The method on a whole tensor: its ratio (the engine's prepare pass), then the chunk function."""
    from mergeengine.methods._checks import expect_at_least

    expect_at_least("model_stock", deltas, 2)
    rows = [d.reshape(-1, d.shape[-1]) if filter_wise and d.dim() > 1 else d.reshape(1, -1) for d in deltas]
    ratio = stock_ratio(rows).float().expand(rows[0].shape).reshape(-1)
    out = model_stock.function(base.reshape(-1), [d.reshape(-1) for d in deltas], filter_wise=filter_wise, ratio=ratio)
    return out.view(base.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_matches_reference(shape, filter_wise, n):
    base, models = fine_tunes(shape, n)
    shared = rand(*shape, seed=50, scale=0.1)  # a common direction: cos > 0
    models = [m + shared for m in models]
    out = model_stock_tensor(base, [m - base for m in models], filter_wise=filter_wise)
    close(out, model_stock_ref(base, models, filter_wise))


def test_model_stock_identical_zero_and_opposed_deltas():
    base = rand(6, 5)
    d = rand(6, 5, seed=4, scale=0.1)
    close(model_stock_tensor(base, [d, d.clone()]), base + d)  # cos 1: t = 1, the average
    close(model_stock_tensor(base, [torch.zeros(6, 5), torch.zeros(6, 5)]), base)
    close(model_stock_tensor(base, [d, -d]), base)  # cos -1: clamped to 0, t = 0
    with pytest.raises(ExecutionError, match="at least 2"):
        model_stock_tensor(base, [d])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_negative_cos_extrapolate_matches_reference(filter_wise):
    base = rand(8, 16)
    d = rand(8, 16, seed=5, scale=0.1)
    opposed = -0.4 * d + rand(8, 16, seed=6, scale=0.03)  # antipodal-ish: mean cosine about -0.8
    models = [base + d, base + opposed]
    out = run_whole(model_stock, base, [d, opposed], filter_wise=filter_wise, negative_cos="extrapolate")
    close(out, model_stock_ref(base, models, filter_wise, negative_cos="extrapolate"))
    clamped = run_whole(model_stock, base, [d, opposed], filter_wise=filter_wise)
    close(clamped, base)  # the default: a negative mean cosine is t = 0, the base
    assert float((out - base).abs().max()) > 0.01  # extrapolated away from the base


# ----------------------------------------------------------------------------- DELLA

def magprune_ref(delta, density, epsilon, draws, rescale):
    """Double-argsort ranks per row (numpy), keep p = density - eps + 2 eps rank / (n - 1)."""
    rows = delta.reshape(-1, delta.shape[-1]).numpy() if delta.dim() > 1 else delta.reshape(1, -1).numpy()
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    p = (density - epsilon) + ranks / (n - 1) * 2 * epsilon
    keep = draws.reshape(rows.shape).numpy() < p.astype(np.float32)
    if rescale == "per_element":
        out = np.where(keep, rows / p.astype(np.float32), 0.0)
    else:
        out = np.where(keep, rows, 0.0)
        if rescale == "l1" and np.abs(out).sum() > 0:
            out = out * (np.abs(rows).sum() / np.abs(out).sum())
    return torch.from_numpy(out.astype(np.float32)).reshape(delta.shape)


def input_draws(generator, shape, n):
    """Each input's uniform draws: its own generator, seeded by one 62-bit draw of the tensor's generator."""
    seeds = torch.randint(0, 1 << 62, (n,), generator=generator).tolist()
    return [torch.rand(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]


def ties_ref(ds, ws, normalize=True, zero_vote="zero"):
    sign = torch.sign(sum(ds))
    if zero_vote == "positive":  # mergekit: a vote of exactly 0 elects +
        sign = torch.where(sign == 0, 1.0, sign)
    agree = [((torch.sign(d) == sign) & (sign != 0)).double() for d in ds]
    num = sum(w * d.double() * a for w, d, a in zip(ws, ds, agree))
    den = sum(w * a for w, a in zip(ws, agree))
    if not normalize:
        return num
    return torch.where(den > 0, num / den.clamp(min=1e-30), 0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["per_element", "l1", "none"])
def test_della_matches_reference(shape, rescale):
    base, models = fine_tunes(shape, 2)
    deltas = [m - base for m in models]
    density, eps, w = [0.4, 0.6], [0.1, 0.2], [1.0, 0.5]
    out = run_whole(della, base, deltas, density=density, epsilon=eps, weights=w, lambda_=0.8, rescale=rescale)
    draws = input_draws(tensor_generator(0, "m", "w"), shape, len(deltas))
    pruned = [magprune_ref(d, p, e, u, rescale) for d, p, e, u in zip(deltas, density, eps, draws)]
    close(out, base.double() + 0.8 * ties_ref(pruned, w))
    lin = run_whole(della_linear, base, deltas, density=density, epsilon=eps, weights=w, rescale=rescale)
    close(lin, base.double() + sum(wi * p.double() for wi, p in zip(w, pruned)))


def test_della_keep_rate_is_density_and_per_element_is_unbiased():
    delta = rand(200, 500)
    kept = []
    for seed in range(8):
        out = run_whole(della, torch.zeros_like(delta), [delta], density=[0.3], epsilon=[0.1], weights=[1.0],
                        seed=seed)
        kept.append(out)
    rate = sum(float((k != 0).float().mean()) for k in kept) / len(kept)
    assert abs(rate - 0.3) < 0.005
    mean = torch.stack(kept).mean(0)
    big = delta.abs() > delta.abs().median()  # larger magnitudes are kept more often, still unbiased
    assert float((mean - delta)[big].mean().abs()) < 0.05 * float(delta[big].abs().mean())


def test_della_zero_deltas_density_one_and_bad_epsilon():
    base = rand(4, 9)
    zero = [torch.zeros(4, 9), torch.zeros(4, 9)]
    one = {"epsilon": [0.15], "weights": [1.0]}
    close(run_whole(della, base, zero, density=[0.5, 0.5], epsilon=[0.15, 0.15], weights=[1.0, 1.0]), base)
    d = rand(4, 9, seed=2)
    close(run_whole(della, base, [d], density=[1.0], **one), base + d)
    with pytest.raises(ExecutionError, match="density ± epsilon"):
        run_whole(della, base, [d], density=[0.1], **one)


def tied_deltas(shape):
    """Two deltas whose sum is exactly 0 on every other entry (a tied vote there), not elsewhere."""
    a, b = rand(*shape, seed=11, scale=0.1), rand(*shape, seed=12, scale=0.1)
    tie = (torch.arange(a.numel()) % 2 == 0).reshape(shape)
    return [a, torch.where(tie, -a, b)], tie


@pytest.mark.parametrize("zero_vote", ["zero", "positive"])
def test_della_zero_vote_on_a_tied_vote_matches_reference(zero_vote):
    base = rand(6, 10)
    deltas, tie = tied_deltas((6, 10))
    out = run_whole(della, base, deltas, density=[1.0, 1.0], epsilon=[0.1, 0.1], weights=[1.0, 1.0],
                    zero_vote=zero_vote)
    close(out, base.double() + ties_ref(deltas, [1.0, 1.0], zero_vote=zero_vote))
    tied = (out - base)[tie]
    if zero_vote == "zero":
        assert torch.equal(tied, torch.zeros_like(tied))  # nothing agrees: the base
    else:
        close(tied, deltas[0].abs()[tie])  # + elected: the positive one of each pair


# ----------------------------------------------------------------------------- breadcrumbs_ties, SCE

def band_ref(d, density, gamma):
    """Sort by (-|d|, index); zero the first round(gamma n), keep the next round(density n)."""
    flat = d.flatten()
    n = flat.numel()
    order = sorted(range(n), key=lambda i: (-abs(flat[i].item()), i))
    top = math.floor(gamma * n + 0.5)
    keep = order[top: min(n, top + math.floor(density * n + 0.5))]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(d)


@pytest.mark.parametrize("shape", SHAPES)
def test_breadcrumbs_ties_matches_reference(shape):
    base, models = fine_tunes(shape, 3)
    deltas = [m - base for m in models]
    density, gamma, w = [0.3, 0.5, 0.4], [0.05, 0.0, 0.1], [1.0, 2.0, 1.0]
    out = breadcrumbs_ties(base, deltas, density=density, gamma=gamma, weights=w, lambda_=1.1)
    masked = [band_ref(d, p, g) for d, p, g in zip(deltas, density, gamma)]
    close(out, base.double() + 1.1 * ties_ref(masked, w))
    out = breadcrumbs_ties(base, deltas, density=density, gamma=gamma, weights=w, normalize=False)
    close(out, base.double() + ties_ref(masked, w, normalize=False))


def sce_ref(base, models, select_topk, zero_vote="zero"):
    tv = torch.stack([m.double() - base.double() for m in models])
    if select_topk < 1:
        var = tv.var(dim=0, unbiased=False).flatten()
        k = math.floor(int(torch.count_nonzero(var)) * select_topk + 0.5)
        order = sorted(range(var.numel()), key=lambda i: (-var[i].item(), i))[:k]
        mask = torch.zeros_like(var)
        mask[order] = 1
        tv = tv * mask.view(tv.shape[1:])
    w = (tv ** 2).reshape(tv.shape[0], -1).mean(-1)
    w = w / w.sum()
    return base.double() + ties_ref(list(tv), list(w), zero_vote=zero_vote)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_matches_reference(shape, select_topk):
    base, models = fine_tunes(shape, 3)
    out = run_whole(sce, base, [m - base for m in models], select_topk=select_topk)
    close(out, sce_ref(base, models, select_topk))


@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce_zero_vote_positive_on_a_tied_vote_matches_reference(select_topk):
    base = rand(6, 10)
    deltas, tie = tied_deltas((6, 10))
    models = [base + d for d in deltas]
    out = run_whole(sce, base, [m - base for m in models], select_topk=select_topk, zero_vote="positive")
    close(out, sce_ref(base, models, select_topk, zero_vote="positive"))
    default = run_whole(sce, base, [m - base for m in models], select_topk=select_topk)
    close(default, sce_ref(base, models, select_topk))
    assert not torch.equal(out, default)


def test_sce_and_breadcrumbs_ties_zero_and_identical_deltas():
    base = rand(5, 5)
    zero = [torch.zeros(5, 5), torch.zeros(5, 5)]
    close(run_whole(sce, base, zero, select_topk=0.5), base)
    close(breadcrumbs_ties(base, zero, density=[0.5, 0.5], gamma=[0.01, 0.01], weights=[1.0, 1.0]), base)
    d = rand(5, 5, seed=8)
    close(run_whole(sce, base, [d, d.clone()]), base + d)  # identical: weights 1/2 each, all agree
    close(run_whole(sce, base, [d, d.clone()], select_topk=0.5), base)  # no variance: nothing selected


# ----------------------------------------------------------------------------- nearswap, passthrough, arcee_fusion

@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_matches_reference(shape):
    base, (model,) = fine_tunes(shape, 1)
    t = 0.05
    w = (t / (base - model).abs().clamp(min=1e-6)).clamp(0, 1)
    close(nearswap(base, [model], t=t), w * model + (1 - w) * base)
    close(nearswap(base, [base.clone()], t=t), base)  # identical


def test_passthrough_scales():
    a = rand(3, 3)
    close(passthrough(None, [a], scale=0.5), 0.5 * a)
    close(passthrough(None, [a]), a)


def arcee_ref(base, model, kl_dtype=torch.float64):
    diff = (model - base).abs()
    p = torch.softmax(model.to(kl_dtype), dim=-1) + 1e-8
    q = torch.softmax(base.to(kl_dtype), dim=-1) + 1e-8
    imp = diff * torch.sum(p * torch.log(p / q), dim=-1).unsqueeze(-1).float()
    s = torch.sort(imp.flatten()).values

    def quant(q):
        return s[int(q * (s.numel() - 1))]

    thr = quant(0.5) + 1.5 * (quant(0.75) - quant(0.25))
    return base + (model - base) * (imp >= thr).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_reference(shape):
    base, (model,) = fine_tunes(shape, 1)
    model = model + rand(*shape, seed=30) * (rand(*shape, seed=31) > 1.5)  # a few large changes
    out = arcee_fusion(base, [model])
    close(out, arcee_ref(base, model))
    assert 0 < int((out != base).sum()) < base.numel() // 2
    close(arcee_fusion(base, [base.clone()]), base)  # identical


def test_arcee_fusion_kl_float32_matches_reference():
    base = rand(64, 128, seed=40)
    model = base + rand(64, 128, seed=41, scale=1e-3)  # close models: the KL is a small difference
    out = arcee_fusion(base, [model], kl_dtype="float32")
    close(out, arcee_ref(base, model, kl_dtype=torch.float32))
    assert not torch.equal(out, arcee_fusion(base, [model]))  # float64 keeps other entries


# ----------------------------------------------------------------------------- thread independence

def _every_method(base, models):
    deltas = [m - base for m in models]
    two = [1.0, 1.0]
    return [
        slerp_tensor(base, models[:1], 0.4),
        nuslerp(base, models, weights=[0.3, 0.7], nuslerp_flatten=False),
        multislerp(base, models, weights=two),
        karcher(None, models),
        model_stock_tensor(base, deltas),
        run_whole(della, base, deltas, density=[0.4, 0.4], epsilon=[0.1, 0.1], weights=two, rescale="l1"),
        run_whole(sce, base, deltas, select_topk=0.5),
    ]


def test_results_do_not_depend_on_the_thread_count():
    base, models = fine_tunes((600, 1000), 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _every_method(base, models)
        torch.set_num_threads(2)
        two = _every_method(base, models)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_sign_elections_reject_negative_weights():
    base = rand(3, 4)
    with pytest.raises(ExecutionError, match=">= 0"):
        breadcrumbs_ties(base, [rand(3, 4, seed=1)] * 2, density=[0.5, 0.5], gamma=[0.0, 0.0], weights=[1.0, -1.0])


@pytest.mark.parametrize("rescale", ["per_element", "l1"])
def test_della_row_blocks_give_the_whole_tensor_bytes(monkeypatch, rescale):
    import mergeengine.methods.della as della_module

    base, (model,) = fine_tunes((300, 96), 1)
    params = {"density": [0.4], "epsilon": [0.1], "weights": [1.0], "rescale": rescale}
    whole = run_whole(della, base, [model - base], **params)  # one block
    monkeypatch.setattr(della_module, "BLOCK_ENTRIES", 4096)  # blocks of 128 rows: 3 blocks, the last short
    assert della_module.block_rows(96) == 128
    assert della_module.chunk_entries((300, 96)) == 128 * 96
    assert torch.equal(run_whole(della, base, [model - base], **params), whole)


@pytest.mark.parametrize("select_topk", [0.5, 0.1])
def test_sce_chunks_give_the_whole_tensor_bytes(monkeypatch, select_topk):
    """Selection, weights and merge streamed over many ragged chunks: the bytes of one chunk,
    ties at the threshold included (a bf16-like grid of deltas makes many variances equal)."""
    from mergeengine.ops import chunks

    base, models = fine_tunes((300, 96), 3)
    deltas = [((m - base) * 64).round() / 64 for m in models]
    whole = run_whole(sce, base, deltas, select_topk=select_topk)
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 4096 * 3)  # 3 chunks, the last short
    assert torch.equal(run_whole(sce, base, deltas, select_topk=select_topk), whole)
