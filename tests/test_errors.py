"""Bad input: one clear line naming the step, tensor or file; nothing half-written."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import write_recipe

from mergeengine import api
from mergeengine.cli import main
from mergeengine.errors import MergeEngineError, ModelError, OutputError, ShapeError
from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint


def recipe(tmp_path, base, ft, extra=""):
    return write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {base}}}
          - {{id: ft, op: load, model: {ft}}}
          - {{id: d, op: diff, model: ft, base: base{extra}}}
          - {{id: out, op: save, input: d, path: out}}
        """)


def test_truncated_safetensors_names_the_file(tmp_path, models, capsys):
    import shutil

    shutil.copytree(models["math"], tmp_path / "ft")
    f = tmp_path / "ft" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    r = recipe(tmp_path, models["base"], tmp_path / "ft")
    with pytest.raises(ModelError, match="truncated"):
        api.plan_recipe(r)
    assert main(["run", str(r)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(f) in line and "truncated" in line


def test_garbage_file_is_not_safetensors(tmp_path, models):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="not a safetensors file"):
        api.plan_recipe(recipe(tmp_path, models["base"], tmp_path / "ft"))


def test_all_input_mismatches_reported_at_once(tmp_path, models):
    shape = LlamaShape(vocab_size=130)
    w = make_weights(shape, 1)
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:, :32]
    del w["model.norm.weight"]
    write_checkpoint(tmp_path / "ft", w, shape)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: ./ft}}
          - {{id: missing, op: load, model: ./nope}}
          - {{id: d, op: diff, model: ft, base: base, vocab: truncate}}
          - {{id: d2, op: diff, model: missing, base: base}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [d, d2]}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    with pytest.raises(MergeEngineError) as info:
        api.plan_recipe(r)
    msg = str(info.value)
    assert "nope" in msg and "model not found" in msg                   # the missing model
    assert "step 'd'" in msg and "'model.norm.weight'" in msg           # the missing tensor
    assert "model.layers.0.mlp.up_proj.weight': shape [176, 32]" in msg  # the shape


def test_vocab_mismatch_message_shows_both_shapes_and_truncate_works(tmp_path, models):
    shape = LlamaShape(vocab_size=136)
    base = {n: t.float() for n, t in make_weights(LlamaShape(), 0).items()}
    ft = make_weights(shape, 0)
    write_checkpoint(tmp_path / "ft", ft, shape)
    with pytest.raises(ShapeError) as info:
        api.plan_recipe(recipe(tmp_path, models["base32"], tmp_path / "ft"))
    assert "[136, 64] in 'ft' vs [128, 64] in 'base'" in str(info.value) and "vocab: truncate" in str(info.value)
    r = recipe(tmp_path, models["base32"], tmp_path / "ft", extra=", vocab: truncate")
    api.run_recipe(r)
    from conftest import read_folder

    out = read_folder(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    assert out[emb].shape == (128, 64)
    torch.testing.assert_close(out[emb], ft[emb][:128])  # base + (ft[:128] - base)
    assert base[emb].shape == (128, 64)


def test_pad_base_keeps_the_new_rows(tmp_path, models):
    shape = LlamaShape(vocab_size=136)
    ft = make_weights(shape, 0)
    write_checkpoint(tmp_path / "ft", ft, shape)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: ft, op: load, model: ./ft}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], vocab: pad_base}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    api.run_recipe(r)
    import json

    from conftest import read_folder

    out = read_folder(tmp_path / "out")
    torch.testing.assert_close(out["lm_head.weight"], ft["lm_head.weight"])  # 0-padded base + full delta
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 136


def test_integer_dtype_mismatch(tmp_path, models):
    shape = LlamaShape()
    a = make_weights(shape, 0)
    b = dict(a)
    a["model.buffer"] = torch.arange(4, dtype=torch.int64)
    b["model.buffer"] = torch.arange(4, dtype=torch.int32)
    write_checkpoint(tmp_path / "a", a, shape)
    write_checkpoint(tmp_path / "b", b, shape)
    with pytest.raises(ShapeError, match="tensor 'model.buffer': dtype torch.int32 in 'ft' vs torch.int64"):
        api.plan_recipe(recipe(tmp_path, tmp_path / "a", tmp_path / "b"))


@pytest.mark.parametrize(("err", "expected"), [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")])
def test_full_disk_and_permission_denied_leave_nothing(tmp_path, models, monkeypatch, err, expected):
    from mergeengine.io import writer

    def fail(self, shard, name, tensor):
        raise OSError(err, "x")  # raised in the writer's worker thread

    monkeypatch.setattr(writer.ShardedWriter, "_write_now", fail)
    with pytest.raises(OutputError, match=expected):
        api.run_recipe(recipe(tmp_path, models["base"], models["math"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_unwritable_destination_fails_before_any_work(tmp_path, models, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(OutputError, match="permission denied"):
        api.run_recipe(recipe(tmp_path, models["base"], models["math"]))


def test_cli_errors_are_one_line_and_traceback_only_when_debugging(tmp_path, capsys, monkeypatch):
    r = recipe(tmp_path, "./nope", "./nope2")
    assert main(["run", str(r)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("MERGEENGINE_DEBUG", "1")
    assert main(["run", str(r)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_os_errors_are_one_line_naming_the_file(tmp_path, models, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "somewhere"))

    monkeypatch.setattr(api, "run_recipe", refused)
    assert main(["run", str(recipe(tmp_path, models["base"], models["math"])), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {tmp_path / 'somewhere'}: Permission denied"
