"""End-to-end runs of the core engine on tiny real checkpoints, checked numerically."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_and_diff_steps, load_tensors, read_folder, write_recipe
from safetensors import safe_open

from mergeengine import api
from mergeengine.errors import NonFiniteError, OutputError
from mergeengine.io.safetensors_reader import SafetensorsCheckpoint
from mergeengine.ops.merge import MergeOp as TaskArithmetic
from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint


def load(folder):
    return load_tensors(folder)


def ta_recipe(tmp_path, models, *, math="math", extra="", save_extra=""):
    return write_recipe(
        tmp_path,
        f"""
        name: t
        steps:
          - {{id: base, op: load, model: {models["base"]}}}
          - {{id: math, op: load, model: {models[math]}}}
          - {{id: code, op: load, model: {models["code"]}}}
          - {{id: d_math, op: diff, model: math, base: base}}
          - {{id: d_code, op: diff, model: code, base: base}}
          - {{id: merged, op: merge, method: task_arithmetic, base: base, inputs: [d_math, d_code],
              weights: [1.0, 0.5], lambda: 0.7{extra}}}
          - {{id: out, op: save, input: merged, path: out{save_extra}}}
        """,
    )


def test_task_arithmetic_matches_direct_computation(tmp_path, models):
    result = api.run_recipe(ta_recipe(tmp_path, models))
    out = read_folder(tmp_path / "out")
    b, m, c = load(models["base"]), load(models["math"]), load(models["code"])
    assert set(out) == set(b)
    for n in b:
        expected = b[n].float() + 0.7 * (
            1.0 * (m[n].float() - b[n].float()) + 0.5 * (c[n].float() - b[n].float())
        )
        assert out[n].dtype == torch.bfloat16  # the base's dtype by default
        torch.testing.assert_close(out[n].float(), expected, atol=1e-6, rtol=8e-3)  # one bf16 ulp
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    assert (tmp_path / "out" / "generation_config.json").exists()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    assert result.stats.tensors_written == len(b)
    assert not list(tmp_path.glob(".*partial*"))


def test_linear_merge_and_dtype(tmp_path, models):
    r = write_recipe(
        tmp_path,
        f"""
        steps:
          - {{id: a, op: load, model: {models["base32"]}}}
          - {{id: b, op: load, model: {models["math32"]}}}
          - {{id: avg, op: merge, method: linear, inputs: [a, b], weights: [3, 1]}}
          - {{id: out, op: save, input: avg, path: out, dtype: float16}}
        """,
    )
    api.run_recipe(r)
    out = read_folder(tmp_path / "out")
    a, b = load(models["base32"]), load(models["math32"])
    for n in a:
        torch.testing.assert_close(out[n].float(), (3 * a[n] + b[n]) / 4, atol=1e-6, rtol=1e-3)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_models_as_merge_inputs_are_diffed_against_base(tmp_path, models):
    r = write_recipe(
        tmp_path,
        f"""
        steps:
          - {{id: base, op: load, model: {models["base32"]}}}
          - {{id: math, op: load, model: {models["math32"]}}}
          - {{id: merged, op: merge, method: task_arithmetic, base: base, inputs: [math], lambda: 0.5}}
          - {{id: out, op: save, input: merged, path: out}}
        """,
    )
    api.run_recipe(r)
    out, b, m = read_folder(tmp_path / "out"), load(models["base32"]), load(models["math32"])
    for n in b:
        torch.testing.assert_close(out[n], b[n] + 0.5 * (m[n] - b[n]))


def test_sharded_input_and_output_give_the_same_values(tmp_path, models):
    api.run_recipe(ta_recipe(tmp_path, models))
    single = read_folder(tmp_path / "out")
    r2 = ta_recipe(
        tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path,
        models,
        math="math_sharded",
        save_extra=", max_shard_bytes: 50KB",
    )
    api.run_recipe(r2)
    folder = tmp_path / "x" / "out"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
    for f in files:
        assert (folder / f).stat().st_size <= 50_000 + 8 + 4096  # data + header
        with safe_open(str(folder / f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
    sharded = read_folder(folder)
    assert set(sharded) == set(single)
    for n in single:
        assert torch.equal(sharded[n], single[n])


def test_two_runs_give_identical_bytes(tmp_path, models):
    r = ta_recipe(tmp_path, models)
    api.run_recipe(r)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    api.run_recipe(r, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first


def test_output_exists_needs_overwrite(tmp_path, models):
    r = ta_recipe(tmp_path, models)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        api.run_recipe(r)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    api.run_recipe(r, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_failure_mid_run_leaves_nothing_behind(tmp_path, models, monkeypatch):
    calls = {"n": 0}
    original = TaskArithmetic.compute

    def failing(self, inputs, ctx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return original(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "compute", failing)
    with pytest.raises(Exception, match="boom") as info:
        api.run_recipe(ta_recipe(tmp_path, models))
    assert "step 'merged'" in str(info.value) and "tensor '" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("step", [
    "{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft]}",
    # DP's mask keeps a NaN (it ranks above inf), so the run names the tensor
    "{id: d, op: diff, model: ft, base: base}\n          - {id: m, op: dp_prune, input: d, density: 0.3}",
])
def test_nan_in_input_is_reported_with_tensor_name(tmp_path, step):
    shape = LlamaShape(num_hidden_layers=1)
    base = make_weights(shape, 0)
    bad = fine_tune(base, 1)
    bad["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    write_checkpoint(tmp_path / "b", base, shape)
    write_checkpoint(tmp_path / "f", bad, shape)
    r = write_recipe(
        tmp_path,
        """
        steps:
          - {id: base, op: load, model: ./b}
          - {id: ft, op: load, model: ./f}
          - STEP
          - {id: out, op: save, input: m, path: out}
        """.replace("STEP", step),
    )
    with pytest.raises(NonFiniteError, match="model.layers.0.mlp.up_proj.weight"):
        api.run_recipe(r)
    assert not (tmp_path / "out").exists()
    api.run_recipe(r, allow_nonfinite=True)
    assert (tmp_path / "out").exists()


def _deep_run(tmp_path, layers):
    shape = LlamaShape(num_hidden_layers=layers, vocab_size=64)
    base = make_weights(shape, 0)
    root = tmp_path / f"l{layers}"
    for name, seed in [("b", None), ("f1", 1), ("f2", 2)]:
        write_checkpoint(root / name, base if seed is None else fine_tune(base, seed), shape)
    r = write_recipe(root, """
        steps:
          - {id: base, op: load, model: ./b}
          - {id: f1, op: load, model: ./f1}
          - {id: f2, op: load, model: ./f2}
          - {id: d1, op: diff, model: f1, base: base}
          - {id: d2, op: diff, model: f2, base: base}
          - {id: p1, op: dp_prune, input: d1, density: 0.3}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [p1, d2]}
          - {id: out, op: save, input: m, path: out}
        """)
    return api.run_recipe(r)


def test_peak_memory_stays_a_few_tensors_whatever_the_depth(tmp_path):
    shallow, deep = _deep_run(tmp_path, 4), _deep_run(tmp_path, 24)
    largest = max(m.nbytes for m in deep.plan.metas["d1"].values())
    total = sum(m.nbytes for m in deep.plan.metas["d1"].values())
    # live tensors (a few) + read-ahead of the next tensor's three inputs (bf16... here float32)
    assert deep.stats.peak_live_bytes <= 8 * largest
    assert deep.stats.peak_live_bytes < total / 10
    assert deep.stats.peak_live_bytes == shallow.stats.peak_live_bytes  # does not grow with layers
    # the dry-run estimate is exact: same accounting (read-ahead included), same schedule
    assert deep.plan.estimate.peak_live_bytes == deep.stats.peak_live_bytes
    assert deep.plan.estimate.bytes_read == deep.stats.bytes_read


def test_schedule_finishes_each_tensor_before_loading_the_next(tmp_path, models):
    plan = api.plan_recipe(ta_recipe(tmp_path, models))
    seen_done: set[str] = set()
    current = None
    for key in plan.order:
        if key.step in ("base", "math", "code"):
            assert key.tensor not in seen_done
            if current is not None and key.tensor != current:
                assert current in seen_done, f"loaded {key.tensor} before {current} was written"
            current = key.tensor
        if key.step == "out":
            seen_done.add(key.tensor)


def test_dry_run_reads_no_tensor_data(tmp_path, models, monkeypatch, capsys):
    from mergeengine.cli import main

    def no_read(self, name):
        raise AssertionError("tensor data read during planning")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_read)
    r = ta_recipe(tmp_path, models)
    assert main(["run", str(r), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "estimated peak live memory" in text and "tensors written: 21" in text
    assert not (tmp_path / "out").exists()


def test_diffs_feeding_a_merge_are_fused(tmp_path, models):
    plan = api.plan_recipe(ta_recipe(tmp_path, models))
    assert not [k for k in plan.order if k.step in ("d_math", "d_code")]  # no materialised deltas
    assert any("fused" in n for n in plan.ops["merged"].plan_notes())
    # a diff that is also used elsewhere still runs, for that other use
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: p, op: magnitude_prune, input: d, density: 0.5}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [d, p]}}
          - {{id: out, op: save, input: m, path: out}}
        """, "r2.yaml")
    plan = api.plan_recipe(r)
    assert [k for k in plan.order if k.step == "d"]


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_ties", "breadcrumbs"])
def test_merge_feeding_only_a_save_emits_the_stored_dtype_with_the_same_bytes(tmp_path, models, method):
    """A merge whose only consumer is a bf16 save rounds chunks straight into bf16 (half the
    memory); a second float32 save of the same merge keeps float32 results. Same bf16 bytes."""
    extra = {"ties": ", density: 0.5", "dare_ties": ", density: 0.5", "breadcrumbs": ", density: 0.5, gamma: 0.0"}
    inputs = "[math, code]" if method == "linear" else "[d_math, d_code]"
    text = f"""
        name: t
        steps:
{load_and_diff_steps(models)}
          - {{id: merged, op: merge, method: {method}, base: base, inputs: {inputs}{extra.get(method, "")}}}
          - {{id: out, op: save, input: merged, path: a, dtype: bfloat16}}
        """
    emitting = api.run_recipe(write_recipe(tmp_path, text))
    assert {m.dtype for m in emitting.plan.steps.ops["merged"].metas.values()} == {torch.bfloat16}
    a = read_folder(tmp_path / "a")
    both = api.run_recipe(write_recipe(tmp_path, text.rstrip() + "\n          - {id: out32, op: save, input: merged, path: b32, dtype: float32}\n",
                                       name="both.yaml"), overwrite=True)
    assert {m.dtype for m in both.plan.steps.ops["merged"].metas.values()} == {torch.float32}
    b = read_folder(tmp_path / "b32")
    assert set(a) == set(b) and all(torch.equal(a[n], t) for n, t in read_folder(tmp_path / "a").items())
    for n in a:
        assert torch.equal(a[n], b[n].to(torch.bfloat16)), n
    assert emitting.stats.peak_live_bytes < both.stats.peak_live_bytes


def test_compute_bound_tasks_get_every_core_unless_threads_are_fixed(tmp_path, models, monkeypatch):
    """With the automatic thread count, TIES tasks run on every core and loads/saves on all but
    one; an explicit count (``--threads``) is never overridden. Same bytes either way."""
    from mergeengine import runtime

    monkeypatch.setattr(runtime, "all_cores", lambda: 3)
    seen: list[tuple[str, int]] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(1)))
    recipe = ta_recipe(tmp_path, models).read_text().replace(
        "method: task_arithmetic", "method: ties, density: 0.5")
    path = write_recipe(tmp_path, recipe, "ties.yaml")
    try:
        assert runtime.set_threads(None) == 2
        api.run_recipe(path, out=tmp_path / "auto")
        assert seen[0] == 2 and 3 in seen[1:] and seen[-1] in (2, 3)
        assert runtime.use_threads(False) == 2 and runtime.use_threads(True) == 3
        seen.clear()
        assert runtime.set_threads(1) == 1
        api.run_recipe(path, out=tmp_path / "fixed")
        assert seen == [1] and runtime.use_threads(True) is None
    finally:
        runtime.set_threads(1)
    a, b = read_folder(tmp_path / "auto"), read_folder(tmp_path / "fixed")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_numpy_sections_leave_a_core_free_and_restore_the_count(monkeypatch):
    """``numpy_threads`` sizes torch's pool as for a memory-bound task inside the block and restores
    the previous size after it, also on an error; a fixed count (``--threads``) is never changed."""
    from mergeengine import runtime

    monkeypatch.setattr(runtime, "all_cores", lambda: 3)
    seen: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(1)))
    try:
        runtime.set_threads(None)
        runtime.use_threads(True)
        seen.clear()
        with runtime.numpy_threads():
            assert seen == [2]
        assert seen == [2, 3]
        with pytest.raises(RuntimeError), runtime.numpy_threads():
            raise RuntimeError("boom")
        assert seen == [2, 3, 2, 3]
        runtime.set_threads(2)
        seen.clear()
        with runtime.numpy_threads():
            pass
        assert seen == []
    finally:
        runtime.set_threads(1)


def test_run_hands_frozen_objects_back_to_the_collector(tmp_path, models):
    """The executor freezes the long-lived objects for the run only (repeated runs, as a search
    does, must not accumulate frozen garbage), also when the run fails."""
    import gc

    gc.unfreeze()
    api.run_recipe(ta_recipe(tmp_path, models), out=tmp_path / "a")
    assert gc.get_freeze_count() == 0
