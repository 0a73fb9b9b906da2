"""Model resolution (local, hub cache, offline), PyTorch .bin reading, and provenance hashing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch

from mergeengine.errors import ModelError
from mergeengine.io.hashing import checkpoint_provenance, file_sha256, hub_blob_sha256
from mergeengine.io.hub import find_cached_snapshot, looks_like_repo_id, select_repo_files
from mergeengine.io.resolve import open_checkpoint, resolution_of
from mergeengine.io.safetensors_reader import SafetensorsCheckpoint
from mergeengine.io.torch_reader import TorchBinCheckpoint
from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint

SMALL = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, vocab_size=32)
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return make_weights(SMALL, seed=0)


def add_snapshot(
    cache: Path, repo_id: str, commit: str, src: Path, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Lay ``src``'s files out like huggingface_hub does: blobs named by sha256, snapshot symlinks, refs."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: dict[str, torch.Tensor]) -> Path:
    """A fake hub cache with org/tiny at main (fp32) and at branch v1 (bf16); env set after import."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_snapshot(cache, "org/tiny", COMMIT_MAIN, write_checkpoint(tmp_path / "src32", weights, SMALL))
    src16 = write_checkpoint(tmp_path / "src16", weights, SMALL, dtype=torch.bfloat16)
    add_snapshot(cache, "org/tiny", COMMIT_V1, src16, refs=("v1",))
    return cache


# --- hub resolution -------------------------------------------------------------------------------


def test_repo_id_shape() -> None:
    assert looks_like_repo_id("org/name")
    assert looks_like_repo_id("meta-llama/Llama-3.2-1B")
    for local in ("./x/y", "/abs/y", "~/x", "a/b/c", "name", "org/model.safetensors", "a\\b", "org/../x"):
        assert not looks_like_repo_id(local), local


def test_hub_repo_read_from_cache_offline(
    hub_cache: Path, tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    ckpt = open_checkpoint("org/tiny", base_dir=tmp_path)
    assert isinstance(ckpt, SafetensorsCheckpoint)
    res = resolution_of(ckpt)
    assert res.is_hub and res.repo_id == "org/tiny" and res.resolved_revision == COMMIT_MAIN
    assert res.path == hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    assert ckpt.config()["model_type"] == "llama"
    torch.testing.assert_close(ckpt.read("model.norm.weight"), weights["model.norm.weight"])


@pytest.mark.parametrize("revision", ["v1", COMMIT_V1, COMMIT_V1[:10]])
def test_hub_revision_branch_commit_and_short_sha(hub_cache: Path, tmp_path: Path, revision: str) -> None:
    ckpt = open_checkpoint("org/tiny", base_dir=tmp_path, revision=revision)
    assert resolution_of(ckpt).resolved_revision == COMMIT_V1
    assert resolution_of(ckpt).revision == revision
    assert ckpt.tensors()["model.norm.weight"].dtype == torch.bfloat16


def test_hub_offline_not_cached_is_one_clear_line(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        open_checkpoint("org/absent", base_dir=tmp_path, revision="dev")
    msg = str(err.value)
    assert "\n" not in msg
    assert "org/absent" in msg and "revision dev" in msg
    assert "hf download org/absent --revision dev" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ModelError, match="revision nope"):
        open_checkpoint("org/tiny", base_dir=tmp_path, revision="nope")  # repo cached, revision not


def test_hub_partial_snapshot_offline(hub_cache: Path, tmp_path: Path) -> None:
    snap = hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    (snap / "model.safetensors").unlink()  # e.g. only config.json was ever fetched
    with pytest.raises(ModelError, match="missing weight files.*hf download org/tiny"):
        open_checkpoint("org/tiny", base_dir=tmp_path)


def test_missing_local_paths_are_not_repo_ids(tmp_path: Path) -> None:
    for spec in ("./nope", str(tmp_path / "nope"), "a/b/c", "nope"):
        with pytest.raises(ModelError, match="model not found") as err:
            open_checkpoint(spec, base_dir=tmp_path)
        assert "nope" in str(err.value) or "a/b/c" in str(err.value)


def test_local_folder_wins_over_repo_id(
    hub_cache: Path, tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    write_checkpoint(tmp_path / "org" / "tiny", weights, SMALL)
    ckpt = open_checkpoint("org/tiny", base_dir=tmp_path)
    assert not resolution_of(ckpt).is_hub
    assert resolution_of(ckpt).path == tmp_path / "org" / "tiny"


def test_select_repo_files_only_what_a_merge_needs() -> None:
    files = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "merges.txt",
        "vocab.json",
        "chat_template.jinja",
        "README.md",
        ".gitattributes",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "consolidated.safetensors",
        "pytorch_model.bin",
        "model.gguf",
        "training_args.pt",
        "original/params.json",
        "onnx/model.onnx",
        "pytorch_model.bin.index.json",
    ]
    got = set(select_repo_files(files))
    assert got == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "merges.txt",
        "vocab.json",
        "chat_template.jinja",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    }
    bin_only = [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "model.gguf",
    ]
    with pytest.raises(ModelError, match="allow_pickle: true"):
        select_repo_files(bin_only, repo_id="org/old")
    assert set(select_repo_files(bin_only, allow_pickle=True)) == set(bin_only) - {"model.gguf"}
    with pytest.raises(ModelError, match="no safetensors"):
        select_repo_files(["config.json", "model.gguf"])


def test_hub_download_when_online_fetches_only_needed_files(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: dict[str, torch.Tensor]
) -> None:
    """Online, not cached: list the repo, then snapshot_download exactly the chosen files (mocked: no network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls: dict[str, object] = {}
    src = write_checkpoint(tmp_path / "remote", weights, SMALL)

    class FakeApi:
        def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
            calls["listed"] = (repo_id, revision)
            return [
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "model.gguf",
                "sub/x.safetensors",
            ]

    def fake_snapshot_download(
        repo_id: str, *, revision: str | None, cache_dir: str, allow_patterns: list[str]
    ) -> str:
        calls["download"] = (repo_id, revision, cache_dir, sorted(allow_patterns))
        return str(add_snapshot(Path(cache_dir), repo_id, "c" * 40, src))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = open_checkpoint("org/fresh", base_dir=tmp_path)
    assert calls["listed"] == ("org/fresh", None)
    assert calls["download"] == ("org/fresh", None, str(hub_cache), ["config.json", "model.safetensors"])
    assert resolution_of(ckpt).resolved_revision == "c" * 40
    # cached now: a second open makes no call even online
    calls.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", None)
    open_checkpoint("org/fresh", base_dir=tmp_path)
    assert calls == {}


# --- PyTorch .bin --------------------------------------------------------------------------------


def write_bin(folder: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SMALL.config(torch.float32)))
    names = list(weights)
    if shards == 1:
        torch.save(weights, folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for i in range(shards):
        part = {n: weights[n] for n in names[i::shards]}
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_needs_allow_pickle_then_reads(
    tmp_path: Path, weights: dict[str, torch.Tensor], shards: int
) -> None:
    folder = write_bin(tmp_path / "old", weights, shards)
    with pytest.raises(ModelError, match="allow_pickle: true"):
        open_checkpoint(str(folder), base_dir=tmp_path)
    ckpt = open_checkpoint(str(folder), base_dir=tmp_path, allow_pickle=True)
    assert isinstance(ckpt, TorchBinCheckpoint)
    assert set(ckpt.tensors()) == set(weights)
    assert len(ckpt.weight_files()) == shards
    for name, t in weights.items():
        assert ckpt.tensors()[name].shape == tuple(t.shape)
        torch.testing.assert_close(ckpt.read(name), t)
    assert ckpt.config()["model_type"] == "llama"


def test_single_bin_file_and_legacy_format(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    ckpt = open_checkpoint(str(path), base_dir=tmp_path, allow_pickle=True)
    torch.testing.assert_close(ckpt.read("lm_head.weight"), weights["lm_head.weight"])


def test_safetensors_preferred_over_bin(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    folder = write_bin(tmp_path / "both", weights)
    write_checkpoint(folder, weights, SMALL)
    assert isinstance(
        open_checkpoint(str(folder), base_dir=tmp_path, allow_pickle=True), SafetensorsCheckpoint
    )
    assert isinstance(open_checkpoint(str(folder), base_dir=tmp_path), SafetensorsCheckpoint)


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_bin_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model.bin: refused to load.*GLOBAL posix.system") as err:
        open_checkpoint(str(folder), base_dir=tmp_path, allow_pickle=True)
    assert "\n" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
    with open(folder / "pytorch_model.bin", "wb") as f:  # plain pickle (not torch's zip format)
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(ModelError, match="refused to load"):
        open_checkpoint(str(folder), base_dir=tmp_path, allow_pickle=True)


# --- hashing and provenance ----------------------------------------------------------------------


@pytest.fixture
def hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEENGINE_CACHE", str(tmp_path / "me_cache"))
    return tmp_path / "me_cache" / "sha256.json"


def test_file_sha256_hashes_and_caches(tmp_path: Path, hash_cache: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(f) == want
    assert json.loads(hash_cache.read_text())["files"][str(f.resolve())]["sha256"] == want
    # an unchanged file: the cached value is used (the file is not read again)
    with mock.patch("builtins.open", side_effect=AssertionError("read again")):
        assert file_sha256(f) == want
    # new content with the old size and mtime (cp -p, rsync -a): its ctime moved, so it is hashed again
    st = f.stat()
    f.write_bytes(b"xyz" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == hashlib.sha256(b"xyz" * 1000).hexdigest()


def test_hub_blob_name_is_trusted_only_when_sha256(tmp_path: Path, hash_cache: Path) -> None:
    repo = tmp_path / "hub" / "models--org--x"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT_MAIN
    snap.mkdir(parents=True)
    lfs = "1" * 64  # name says sha256; content differs: proves the file is not read
    (repo / "blobs" / lfs).write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(f"../../blobs/{lfs}")
    assert file_sha256(snap / "model.safetensors") == lfs
    git_sha1 = "2" * 40  # small git file: etag is a git sha1, not trusted
    (repo / "blobs" / git_sha1).write_bytes(b"{}")
    (snap / "config.json").symlink_to(f"../../blobs/{git_sha1}")
    assert file_sha256(snap / "config.json") == hashlib.sha256(b"{}").hexdigest()
    # huggingface_hub 2.x shared store: blobs/<etag> -> <cache>/blobs/<xx>/<xet hash>; the etag wins
    xet = "3" * 64
    store = tmp_path / "hub" / "blobs" / xet[:2]
    store.mkdir(parents=True)
    (store / xet).write_bytes(b"shared")
    etag = "4" * 64
    (repo / "blobs" / etag).symlink_to(f"../../blobs/{xet[:2]}/{xet}")
    (snap / "shard.safetensors").symlink_to(f"../../blobs/{etag}")
    assert hub_blob_sha256(snap / "shard.safetensors") == etag
    assert hub_blob_sha256(store / xet) is None


def test_checkpoint_provenance_hub(hub_cache: Path, tmp_path: Path, hash_cache: Path) -> None:
    ckpt = open_checkpoint("org/tiny", base_dir=tmp_path, revision="v1")
    res = resolution_of(ckpt)
    prov = checkpoint_provenance(ckpt, "org/tiny", res.revision, res.resolved_revision)
    data = (res.path / "model.safetensors").read_bytes()
    assert prov == {
        "model": "org/tiny",
        "resolved_path": str(res.path),
        "revision": "v1",
        "resolved_revision": COMMIT_V1,
        "files": {"model.safetensors": hashlib.sha256(data).hexdigest()},
    }
    assert not hash_cache.exists()  # hub blobs need no hashing


def test_find_cached_snapshot_uses_env_cache(hub_cache: Path) -> None:
    snap = find_cached_snapshot("org/tiny", None)
    assert snap is not None and snap.commit == COMMIT_MAIN
    assert find_cached_snapshot("org/tiny", "missing") is None
    with pytest.raises(ModelError, match="not a branch"):
        find_cached_snapshot("org/tiny", "../../etc")


def test_safetensors_reader_maps_tensors_copy_on_write(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Tensors come back equal to what was written; writing to one never changes the file."""
    write_checkpoint(tmp_path / "m", weights, SMALL)
    ckpt = SafetensorsCheckpoint(tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    t = ckpt.read(name)
    assert torch.equal(t, weights[name])
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    t.add_(1.0)
    ckpt.close()
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert torch.equal(SafetensorsCheckpoint(tmp_path / "m").read(name), weights[name])


def test_safetensors_header_size_mismatch_is_a_model_error(tmp_path: Path) -> None:
    """A header whose byte range disagrees with shape x dtype is refused when the model is opened."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(ModelError, match="tensor 'w' holds 60 bytes .* need 64"):
        SafetensorsCheckpoint(f)
