"""Output folders: transformers loads them; tied embeddings; tokenizer_from / copy_files; .bin inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_folder, write_recipe

from mergeengine import api
from mergeengine.errors import ModelError
from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint


def test_transformers_loads_the_merged_tiny_model(tmp_path, models):
    transformers = pytest.importorskip("transformers")
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math']}}}
          - {{id: m, op: merge, method: ties, base: base, inputs: [math], density: 0.5}}
          - {{id: out, op: save, input: m, path: out, max_shard_bytes: 60KB}}
        """)
    api.run_recipe(r)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    saved = read_folder(tmp_path / "out")
    for n, t in saved.items():
        assert torch.equal(state[n], t)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tied_embeddings_stay_tied(tmp_path):
    transformers = pytest.importorskip("transformers")
    shape = LlamaShape(tie_word_embeddings=True)
    base = make_weights(shape, 0)
    write_checkpoint(tmp_path / "b", base, shape)
    write_checkpoint(tmp_path / "f", fine_tune(base, 1), shape)
    r = write_recipe(tmp_path, """
        steps:
          - {id: base, op: load, model: ./b}
          - {id: ft, op: load, model: ./f}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], lambda: 0.5}
          - {id: out, op: save, input: m, path: out}
        """)
    api.run_recipe(r)
    assert "lm_head.weight" not in read_folder(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_from_and_copy_files(tmp_path, models):
    import shutil

    for name in ("base", "math"):
        shutil.copytree(models[name], tmp_path / name)
    (tmp_path / "math" / "tokenizer.json").write_text('{"from": "math"}')
    (tmp_path / "base" / "tokenizer.json").write_text('{"from": "base"}')
    (tmp_path / "base" / "LICENSE").write_text("license text")
    r = write_recipe(tmp_path, """
        steps:
          - {id: base, op: load, model: ./base}
          - {id: math, op: load, model: ./math}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}
          - {id: out, op: save, input: m, path: out, tokenizer_from: math, copy_files: [LICENSE]}
        """)
    api.run_recipe(r)
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"from": "math"}
    assert (tmp_path / "out" / "LICENSE").read_text() == "license text"
    r.write_text(r.read_text().replace("[LICENSE]", "[NOTICE]"))
    with pytest.raises(ModelError, match="NOTICE"):
        api.run_recipe(r, overwrite=True)
    assert (tmp_path / "out" / "LICENSE").exists()  # the earlier output is untouched


def test_pytorch_bin_needs_allow_pickle(tmp_path, models):
    shape = LlamaShape()
    weights = fine_tune(make_weights(shape, 0), 1)
    (tmp_path / "ft").mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in weights.items()}, tmp_path / "ft" / "pytorch_model.bin")
    (tmp_path / "ft" / "config.json").write_text(json.dumps(shape.config(torch.bfloat16)))
    text = f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: ./ft ALLOW}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft]}}
          - {{id: out, op: save, input: m, path: out}}
        """
    r = write_recipe(tmp_path, text.replace(" ALLOW", ""))
    with pytest.raises(ModelError, match="allow_pickle: true"):
        api.plan_recipe(r)
    r = write_recipe(tmp_path, text.replace("./ft ALLOW", "./ft, allow_pickle: true"))
    api.run_recipe(r)
    out = read_folder(tmp_path / "out")
    torch.testing.assert_close(out["model.norm.weight"], weights["model.norm.weight"].to(torch.bfloat16))


def _pieces(seed: int) -> list[bytes]:
    """Writes of awkward sizes: empty, one byte, around the block and stage sizes."""
    import random

    from mergeengine.io import writer

    rng = random.Random(seed)
    sizes = [0, 1, 4095, 4097, writer.DIRECT_STAGE_BYTES - 3, 5, writer.DIRECT_STAGE_BYTES + 7, 12345]
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
def test_shard_files_hold_exactly_the_bytes_written(tmp_path, monkeypatch, direct):
    """``O_DIRECT`` through the aligned stage (padding truncated away) and buffered writes give the
    same file; the size is exact whatever the last block holds."""
    from mergeengine.io import writer

    monkeypatch.setattr(writer, "DIRECT_IO", direct)
    pieces = _pieces(1)
    f = writer.ShardFile(tmp_path / "shard.safetensors")
    if direct and hasattr(__import__("os"), "O_DIRECT"):
        assert f.direct  # this filesystem (the test machine's) takes O_DIRECT
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    assert (tmp_path / "shard.safetensors").read_bytes() == b"".join(pieces)
    small = writer.ShardFile(tmp_path / "small")
    small.write(memoryview(b"abc"))
    small.close()
    assert (tmp_path / "small").read_bytes() == b"abc"


@pytest.mark.parametrize("code", ["EINVAL", "EOPNOTSUPP"])
def test_shard_files_fall_back_to_buffered_writes(tmp_path, monkeypatch, code):
    """A filesystem that refuses ``O_DIRECT`` at open, or only at the first write, gets a buffered
    file with the same bytes; an abort removes the file."""
    import errno
    import os

    from mergeengine.io import writer

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    pieces = _pieces(2)
    real_open, real_pwrite = os.open, os.pwrite

    def refuse_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(getattr(errno, code), code)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_open)
    f = writer.ShardFile(tmp_path / "a")
    assert not f.direct
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    assert (tmp_path / "a").read_bytes() == b"".join(pieces)
    monkeypatch.setattr(os, "open", real_open)

    direct_fds: set[int] = set()

    def remember_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # fd numbers are reused
        return fd

    def refuse_write(fd, data, offset):
        if fd in direct_fds:
            raise OSError(getattr(errno, code), code)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", remember_open)
    monkeypatch.setattr(os, "pwrite", refuse_write)
    f = writer.ShardFile(tmp_path / "b")
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    assert not f.direct and (tmp_path / "b").read_bytes() == b"".join(pieces)
    g = writer.ShardFile(tmp_path / "c")
    g.write(memoryview(b"partial"))
    g.abort()
    assert not (tmp_path / "c").exists()
