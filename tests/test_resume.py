"""Interrupted runs: nothing at the destination; --resume finishes with identical bytes."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe

from mergeengine import api
from mergeengine.ops.merge import MergeOp as TaskArithmetic


def recipe(tmp_path, models, out="out"):
    return write_recipe(
        tmp_path,
        f"""
        seed: 3
        steps:
          - {{id: base, op: load, model: {models["base"]}}}
          - {{id: math, op: load, model: {models["math"]}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: p, op: dp_prune, input: d, density: 0.3}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [p]}}
          - {{id: out, op: save, input: m, path: {out}, max_shard_bytes: 30KB}}
        """,
    )


def files(folder):
    """Every file but the card and provenance (which name the output path)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("README.md", "mergeengine.json")}


def interrupt_at(monkeypatch, n, exc=KeyboardInterrupt):
    calls = {"n": 0}
    original = TaskArithmetic.compute

    def compute(self, inputs, ctx):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc()
        return original(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "compute", compute)
    return calls


def test_resume_after_interrupt_gives_identical_bytes(tmp_path, models, monkeypatch):
    r = recipe(tmp_path, models, out="reference")
    api.run_recipe(r)
    reference = files(tmp_path / "reference")
    assert sum(n.startswith("model-") for n in reference) >= 4

    r = recipe(tmp_path, models)
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.partial"
    done = json.loads((partial / ".mergeengine-progress.json").read_text())["shards"]
    assert done and all((partial / f).exists() for f in done)

    calls = interrupt_at(monkeypatch, 10**9)
    result = api.run_recipe(r, resume=True)
    assert files(tmp_path / "out") == reference
    assert not partial.exists()
    assert calls["n"] < 21  # finished shards were not recomputed
    assert result.stats.tensors_written == calls["n"]


def test_corrupt_shard_is_recomputed_on_resume(tmp_path, models, monkeypatch):
    r = recipe(tmp_path, models, out="reference")
    api.run_recipe(r)
    reference = files(tmp_path / "reference")
    r = recipe(tmp_path, models)
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    partial = tmp_path / ".out.partial"
    first = sorted(json.loads((partial / ".mergeengine-progress.json").read_text())["shards"])[0]
    data = bytearray((partial / first).read_bytes())
    data[-1] ^= 0xFF
    (partial / first).write_bytes(bytes(data))
    interrupt_at(monkeypatch, 10**9)
    api.run_recipe(r, resume=True)
    assert files(tmp_path / "out") == reference


def test_resume_ignores_progress_of_a_different_recipe(tmp_path, models, monkeypatch):
    r = recipe(tmp_path, models)
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    r.write_text(r.read_text().replace("seed: 3", "seed: 4"))
    calls = interrupt_at(monkeypatch, 10**9)
    api.run_recipe(r, resume=True)
    assert calls["n"] == 21  # everything recomputed


def test_error_without_finished_shard_leaves_no_partial(tmp_path, models, monkeypatch):
    interrupt_at(monkeypatch, 1, exc=lambda: RuntimeError("boom"))
    with pytest.raises(Exception, match="boom"):
        api.run_recipe(recipe(tmp_path, models))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
