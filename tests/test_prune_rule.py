"""``prune_rule: exact | release`` against independent whole-tensor implementations of each rule.

exact (DPPA.md step 6): drop the k = floor(numel * (1 - d)) smallest magnitudes, keep |D| > the
k-th smallest. release (the DPPA release, from OWL's prune_magnitude): thresh =
sort(|W|)[int(numel * (1 - d))], prune every |W| <= thresh. Ties are where the rules bite, so most
deltas here are quantised (many equal magnitudes); the large ones go through the sampled and
streamed selection paths (>= 2**20 entries).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHAPE, read_folder, write_recipe

from mergeengine import api
from mergeengine.kernels import dp_density, dpa_scale
from mergeengine.kernels.prune_rule import pruned_count
from mergeengine.tiny import make_weights, write_checkpoint


def exact_keep(delta: torch.Tensor, d: float) -> torch.Tensor:
    """Whole-tensor exact rule, written from DPPA.md step 6."""
    a = delta.abs().float()
    k = math.floor(a.numel() * (1 - d) + 1e-6)
    if k == 0:
        return torch.ones_like(a, dtype=torch.bool)
    t = torch.sort(a.flatten()).values[k - 1]
    return a > t


def release_keep(delta: torch.Tensor, d: float) -> torch.Tensor:
    """Whole-tensor release rule, as the release writes it (capped where its index runs past the end)."""
    a = delta.abs().float()
    index = int(a.numel() * (1 - d))
    if index >= a.numel():
        return torch.zeros_like(a, dtype=torch.bool)
    thresh = torch.sort(a.flatten()).values[index]
    return ~(a <= thresh)


KEEP = {"exact": exact_keep, "release": release_keep}


def quantised(shape: tuple[int, ...], seed: int, levels: int = 40) -> torch.Tensor:
    """A delta with many ties: multiples of 2**-10, signs random."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, shape, generator=g).float() / 1024


def test_counts() -> None:
    assert [pruned_count(10, d) for d in (0.0, 0.2, 0.9, 1.0)] == [10, 8, 1, 0]
    assert [pruned_count(10, d, "release") for d in (0.0, 0.2, 0.9, 1.0)] == [10, 9, 1, 1]
    assert pruned_count(1000, 0.25, "release") == 751
    with pytest.raises(ValueError, match="unknown prune rule"):
        pruned_count(10, 0.5, "owl")  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["exact", "release"])
@pytest.mark.parametrize("shape", [(7,), (33, 17), (1100, 1000)])
def test_dp_prune_tensor_matches_the_rule_with_ties(rule, shape) -> None:
    delta = quantised(shape, seed=sum(shape))
    for d in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
        expected = torch.where(KEEP[rule](delta, d), delta, 0.0)
        assert torch.equal(dp_density.dp_prune_tensor(delta, d, rule), expected), (rule, shape, d)


@pytest.mark.parametrize("rule", ["exact", "release"])
@pytest.mark.parametrize("shape", [(33, 17), (1100, 1000)])
def test_dpa_partitions_match_the_rule_whole_and_streamed(rule, shape) -> None:
    base = quantised(shape, seed=1, levels=200)
    delta = quantised(shape, seed=2)
    model = base + delta  # exact in float32: model - base == delta
    densities, scales = [0.1, 0.3], [2.0, 0.5]
    k1, k2 = KEEP[rule](delta, densities[0]), KEEP[rule](delta, densities[1])
    expected = torch.where(k1, delta * 2.0, torch.where(k2, delta * 0.5, 0.0))
    assert torch.equal(dpa_scale.dpa_amplify_tensor(delta, densities, scales, rule=rule), expected)
    assert torch.equal(dpa_scale.dpa_amplify_tensor((model, base), densities, scales, rule=rule), expected)
    scaler = dpa_scale.PartitionScaler((model, base), densities, scales, rule=rule)
    flat, out = delta.flatten(), torch.empty(delta.numel())
    for start in range(0, delta.numel(), 1 << 16):  # any chunking: the merge's fused path
        end = min(start + (1 << 16), delta.numel())
        scaler.scale(flat[start:end].clone(), out[start:end])
    assert torch.equal(out.view(shape), expected)
    magnitude = dpa_scale.dpa_amplify_magnitude_tensor(delta, densities, scales, rule)
    assert torch.equal(magnitude, expected)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory):
    """A base and a fine-tune whose deltas are quantised (exact in float32): many tied magnitudes."""
    root = tmp_path_factory.mktemp("tied")
    base = {n: (t * 1024).round() / 1024 for n, t in make_weights(SHAPE, seed=0).items()}
    ft = {}
    for i, (n, t) in enumerate(base.items()):
        ft[n] = t + quantised(tuple(t.shape), seed=100 + i, levels=6 + 3 * (i % 5))
    return {"base": write_checkpoint(root / "base", base, SHAPE), "ft": write_checkpoint(root / "ft", ft, SHAPE),
            "b": base, "d": {n: ft[n] - base[n] for n in base}}


def _run(tmp_path, tied, step: str) -> tuple[dict[str, torch.Tensor], dict]:
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {tied['base']}}}
          - {{id: ft, op: load, model: {tied['ft']}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {step}
          - {{id: out, op: save, input: x, path: out}}
        """)
    api.run_recipe(r, overwrite=True)
    report = tmp_path / "out" / "dppa_report.json"
    return read_folder(tmp_path / "out"), (json.loads(report.read_text())["x"] if report.is_file() else {})


def _densities(report: dict) -> dict[str, float]:
    return {m["tensor"]: m["density"] for layer in report["layers"].values() for m in layer["modules"].values()}


@pytest.mark.parametrize("rule", ["exact", "release"])
def test_dp_prune_op_follows_the_rule(tmp_path, tied, rule) -> None:
    out, report = _run(tmp_path, tied, f"{{id: x, op: dp_prune, input: d, density: 0.2, prune_rule: {rule}}}")
    assert report["prune_rule"] == rule
    densities = _densities(report)
    assert len(densities) == 14
    for n, d in tied["d"].items():
        b = tied["b"][n]
        kept = KEEP[rule](d, densities[n]) if n in densities else torch.ones_like(d, dtype=torch.bool)
        assert torch.equal(out[n], b + torch.where(kept, d, 0.0)), n
        if n in densities:
            module = next(m for layer in report["layers"].values() for m in layer["modules"].values()
                          if m["tensor"] == n)
            assert module["kept"] == d.numel() - pruned_count(d.numel(), densities[n], rule)


def test_release_prunes_the_whole_tie_class_at_its_threshold() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0, -3.0, 4.0])
    # exact: k = floor(5 * 0.4) = 2, keep |D| > 2; release: thresh = sort(|D|)[2] = 3, prune |D| <= 3
    assert dp_density.dp_prune_tensor(delta, 0.6).tolist() == [0.0, 0.0, 3.0, -3.0, 4.0]
    assert dp_density.dp_prune_tensor(delta, 0.6, "release").tolist() == [0.0, 0.0, 0.0, 0.0, 4.0]


def test_release_keeps_one_entry_fewer_per_module_without_ties(tmp_path, models) -> None:
    tied = {"base": models["base32"], "ft": models["math32"]}
    exact, _ = _run(tmp_path, tied, "{id: x, op: dp_prune, input: d, density: 0.2}")
    release, report = _run(tmp_path, tied, "{id: x, op: dp_prune, input: d, density: 0.2, prune_rule: release}")
    base = read_folder(models["base32"])
    for name, density in _densities(report).items():
        numel = base[name].numel()
        kept_exact = int(torch.count_nonzero(exact[name] - base[name]))
        kept_release = int(torch.count_nonzero(release[name] - base[name]))
        assert kept_exact == numel - math.floor(numel * (1 - density) + 1e-6)
        assert kept_release == numel - int(numel * (1 - density)) - 1, name


@pytest.mark.parametrize("rule", ["exact", "release"])
def test_dpa_amplify_op_and_fused_merge_follow_the_rule(tmp_path, tied, rule) -> None:
    parts = "[{density: 0.1, scale: 1.8}, {density: 0.2, scale: 1.2}]"
    out, report = _run(tmp_path, tied, f"{{id: x, op: dpa_amplify, input: d, partitions: {parts}, "
                                      f"factors: own, dense_scale: 1.0, prune_rule: {rule}}}")
    per_partition = [{m["tensor"]: m["density"] for layer in p["layers"].values() for m in layer["modules"].values()}
                     for p in report["partitions"]]
    expected = {}
    for n, d in tied["d"].items():
        if n in per_partition[0]:
            k1, k2 = KEEP[rule](d, per_partition[0][n]), KEEP[rule](d, per_partition[1][n])
            d = torch.where(k1, d * 1.8, torch.where(k2, d * 1.2, 0.0))
        expected[n] = d
        assert torch.equal(out[n], tied["b"][n] + d), n
    # the same amplification inside a task-arithmetic merge (the merge amplifies chunk by chunk)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {tied['base']}}}
          - {{id: ft, op: load, model: {tied['ft']}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: a, op: dpa_amplify, input: d, partitions: {parts}, factors: own, dense_scale: 1.0, prune_rule: {rule}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [a], lambda: 1.0}}
          - {{id: out, op: save, input: m, path: merged}}
        """, name="merge.yaml")
    api.run_recipe(r, overwrite=True)
    merged = read_folder(tmp_path / "merged")
    for n in expected:
        assert torch.equal(merged[n], tied["b"][n] + expected[n]), n


@pytest.mark.parametrize("rule", ["exact", "release"])
def test_magnitude_prune_op_follows_the_rule(tmp_path, tied, rule) -> None:
    out, _ = _run(tmp_path, tied, f"{{id: x, op: magnitude_prune, input: d, density: 0.3, prune_rule: {rule}}}")
    for n, d in tied["d"].items():
        if rule == "release":
            kept = release_keep(d, 0.3)
        else:  # exact: top round(0.3 * numel) magnitudes, ties to the lowest flat index
            k = math.floor(0.3 * d.numel() + 0.5)
            order = sorted(range(d.numel()), key=lambda i: (-float(d.flatten()[i].abs()), i))[:k]
            kept = torch.zeros(d.numel(), dtype=torch.bool)
            kept[order] = True
            kept = kept.view(d.shape)
        assert torch.equal(out[n], tied["b"][n] + torch.where(kept, d, 0.0)), n
