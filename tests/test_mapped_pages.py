"""Input pages released behind streaming passes (mergeengine/io/mapped.py), and the writer
freeing each tensor as soon as it is written."""

from __future__ import annotations

import gc
import mmap
import os
import time
import weakref

import numpy as np
import pytest
import torch
from conftest import read_folder, write_recipe
from safetensors import safe_open

from mergeengine import api
from mergeengine.io import mapped
from mergeengine.io.meta import TensorMeta
from mergeengine.io.safetensors_reader import SafetensorsCheckpoint
from mergeengine.io.writer import ShardedWriter
from mergeengine.ops import chunks

NAME = "model.embed_tokens.weight"

pytestmark = pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="needs Linux's page map")


def _present(t: torch.Tensor) -> np.ndarray:
    """Per page of ``t``'s bytes: is it in the process (page map bit 63)?"""
    first = t.data_ptr() // mapped.PAGE_BYTES
    pages = -(-(t.data_ptr() + t.nbytes) // mapped.PAGE_BYTES) - first
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, pages * 8, first * 8)
    finally:
        os.close(fd)
    return (np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)).astype(bool)


def _file_tensor(folder, name: str = NAME) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
        return h.get_tensor(name)


def _released_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every release's byte count (the real release still runs)."""
    done: list[int] = []
    real = mapped.release

    def spy(mapping: mapped.Mapping, begin: int, end: int) -> int:
        done.append(real(mapping, begin, end))
        return done[-1]
    monkeypatch.setattr(mapped, "release", spy)
    return done


@pytest.mark.parametrize("method, inputs", [("slerp", "[math]"), ("model_stock", "[math, code]"),
                                            ("della", "[math, code]"), ("sce", "[math, code]")])
def test_released_pages_are_read_again_with_the_same_bytes(tmp_path, models, monkeypatch, method, inputs):
    """Two-pass methods on chunks of a few pages, every page released behind the cursor: the output
    is byte for byte the output of a run that keeps every input page."""
    params = {"slerp": "t: 0.3", "model_stock": "{}", "della": "density: 0.5, epsilon: 0.1, rescale: l1",
              "sce": "select_topk: 0.5"}[method]
    extra = "" if params == "{}" else f", {params}"
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math']}}}
          - {{id: code, op: load, model: {models['code']}}}
          - {{id: m, op: merge, method: {method}, base: base, inputs: {inputs}{extra}}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 4096)  # 8 KiB of bf16 per chunk: two pages
    monkeypatch.setattr(mapped, "RELEASE_BYTES", mapped.PAGE_BYTES)
    with monkeypatch.context() as keep:
        keep.setattr(mapped, "release", lambda mapping, begin, end: 0)
        api.run_recipe(r, out=tmp_path / "kept")
    done = _released_bytes(monkeypatch)
    api.run_recipe(r, out=tmp_path / "released")
    assert sum(done) > 0
    kept, released = read_folder(tmp_path / "kept"), read_folder(tmp_path / "released")
    assert kept.keys() == released.keys()
    assert all(torch.equal(kept[n], released[n]) for n in kept)


def test_a_cursor_releases_the_pages_it_passed_and_they_read_back(models, monkeypatch):
    monkeypatch.setattr(mapped, "RELEASE_BYTES", mapped.PAGE_BYTES)
    ckpt = SafetensorsCheckpoint(models["base32"])
    x = ckpt.read(NAME)
    flat = x.reshape(-1)
    assert float(flat.sum()) != 0.0  # every page touched
    assert _present(flat)[1:-1].all()
    cursor = mapped.Cursor(flat)
    cursor.advance(flat.numel() // 2)
    half = _present(flat)
    assert not half[1: len(half) // 2 - 1].any() and half[len(half) // 2 + 1: -1].all()
    cursor.advance(flat.numel())
    assert not _present(flat).any()
    assert torch.equal(x, _file_tensor(models["base32"]))


def test_written_pages_are_never_released(models):
    """A page written through a copy-on-write mapping is private memory: it keeps the write."""
    ckpt = SafetensorsCheckpoint(models["base32"])
    x = ckpt.read(NAME)
    flat = x.reshape(-1)
    per_page = mapped.PAGE_BYTES // flat.element_size()
    at = 3 * per_page + 5
    flat[at] = 1234.5
    float(flat.sum())
    mapped.Cursor(flat).advance(flat.numel())
    present = _present(flat)
    page = (flat[at:].data_ptr() // mapped.PAGE_BYTES) - flat.data_ptr() // mapped.PAGE_BYTES
    assert present[page] and present.sum() == 1
    expected = _file_tensor(models["base32"]).reshape(-1).clone()
    expected[at] = 1234.5
    assert torch.equal(flat, expected)


def test_memory_the_reader_did_not_map_is_never_released(models):
    anonymous = torch.arange(1 << 16, dtype=torch.float32)
    copy = SafetensorsCheckpoint(models["base32"]).read(NAME).clone().reshape(-1)
    for t in (anonymous, copy):
        assert mapped.mapping_of(t) is None
        before = t.clone()
        mapped.Cursor(t).advance(t.numel())
        assert _present(t).all() and torch.equal(t, before)


def test_a_mapping_is_unregistered_and_unmapped_with_its_last_tensor(models):
    gc.collect()
    before = mapped.live_mappings()
    ckpt = SafetensorsCheckpoint(models["base"])
    x = ckpt.read(NAME)
    view = x.reshape(-1)[10:]
    holder = mapped.mapping_of(view)
    assert holder is not None and mapped.live_mappings() == before + 1
    gone = weakref.ref(holder.mapped)
    del x, holder
    assert mapped.live_mappings() == before + 1  # the view still holds it
    del view
    gc.collect()
    assert mapped.live_mappings() == before and gone() is None


def test_the_writer_frees_a_tensor_once_written(tmp_path):
    """Write-behind holds a tensor until it is on disk, not until the next tensor arrives."""
    metas = {"a": TensorMeta((1 << 16,), torch.bfloat16), "b": TensorMeta((16,), torch.bfloat16)}
    writer = ShardedWriter(tmp_path, ["a", "b"], metas, 1 << 30)
    a = torch.ones(1 << 16, dtype=torch.bfloat16)
    storage = weakref.ref(a.untyped_storage())
    writer.write("a", a)
    del a
    deadline = time.monotonic() + 10
    while storage() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert storage() is None
    writer.write("b", torch.zeros(16, dtype=torch.bfloat16))
    writer.finish()
    assert read_folder(tmp_path)["a"].eq(1).all()


def test_release_needs_the_page_map(models, monkeypatch):
    """Where the page map cannot be read, nothing is released."""
    monkeypatch.setattr(mapped, "_page_flags", lambda address, pages: None)
    x = SafetensorsCheckpoint(models["base32"]).read(NAME).reshape(-1)
    float(x.sum())
    mapped.Cursor(x).advance(x.numel())
    assert _present(x)[1:-1].all()
    assert mmap.PAGESIZE == mapped.PAGE_BYTES
