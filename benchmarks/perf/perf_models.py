"""Seeded Llama-shaped bf16 checkpoints for the performance benchmark, written tensor by tensor.

A base model and N fine-tunes are generated together, one tensor name at a time: the base tensor
is drawn from a generator seeded with (seed, name), each fine-tune adds a heavy-tailed delta drawn
from a generator seeded with (seed, fine-tune, name), and every model's bf16 bytes are appended to
its own streaming safetensors writer. Memory stays at a few tensors whatever the model size, and
any model can be rebuilt alone with identical bytes.

The weights follow :func:`mergeengine.tiny.make_weights` (norms ``1 + 0.01 N(0,1)``, matrices
``0.02 N(0,1)``) and the deltas :func:`mergeengine.tiny.fine_tune` (Gaussian noise plus 1% outliers
8x larger), with ``delta_scale`` (default 1e-3) as the noise's standard deviation. The config comes
from :class:`mergeengine.tiny.LlamaShape`, so transformers and mergekit read the folders as Llama.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergeengine.tiny import LlamaShape

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 2 * 10**9
STAMP = "benchmark_stamp.json"


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a set of benchmark checkpoints' bytes."""

    shape: LlamaShape
    seed: int = 0
    delta_scale: float = 1e-3
    outlier_fraction: float = 0.01
    outlier_scale: float = 8.0

    def stamp(self, role: str) -> dict:
        """The identity written beside a finished model (``role``: base, ft1, ft2, ...)."""
        return {"format": FORMAT_VERSION, "role": role, **asdict(self)}

    @property
    def param_count(self) -> int:
        return sum(_numel(s) for s in self.shape.tensor_shapes().values())

    @property
    def model_bytes(self) -> int:
        """bf16 bytes of one model."""
        return 2 * self.param_count


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, parts)).encode()))


def base_tensor(spec: BuildSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base model's float32 tensor ``name`` (reproducible from ``spec.seed`` and the name)."""
    g = _generator(spec.seed, "base", name)
    t = torch.randn(shape, generator=g)
    if len(shape) == 1:
        return t.mul_(0.01).add_(1.0)
    return t.mul_(0.02)


def add_delta(spec: BuildSpec, base: torch.Tensor, name: str, fine_tune: int) -> torch.Tensor:
    """``base`` plus fine-tune ``fine_tune``'s heavy-tailed delta for tensor ``name`` (float32, new)."""
    g = _generator(spec.seed, f"ft{fine_tune}", name)
    out = torch.randn(base.shape, generator=g).mul_(spec.delta_scale).add_(base)
    n_out = max(1, int(base.numel() * spec.outlier_fraction))
    idx = torch.randint(base.numel(), (n_out,), generator=g)
    vals = torch.randn(n_out, generator=g).mul_(spec.delta_scale * spec.outlier_scale)
    out.view(-1).index_add_(0, idx, vals)
    return out


class StreamingSafetensors:
    """Append tensors (in a fixed, known order) into safetensors shards of at most ``max_shard_bytes``.

    Headers are written up front from the shapes, so nothing is buffered. Writes go to
    ``folder`` directly; the caller marks the folder complete (a stamp file) afterwards.
    """

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.shapes = shapes
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape in shapes.items():
            n = 2 * _numel(shape)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        total = len(shards)
        self.files = ["model.safetensors"] if total == 1 else [
            f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)
        ]
        self.shards = shards
        self.file_of = {n: f for f, names in zip(self.files, shards) for n in names}
        self._pending = [n for names in shards for n in names]
        self._pos = 0
        self._fh: BinaryIO | None = None

    def _header(self, names: list[str]) -> bytes:
        head: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n in names:
            nbytes = 2 * _numel(self.shapes[n])
            head[n] = {"dtype": "BF16", "shape": list(self.shapes[n]), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (cast to bf16) as ``name``, which must be the next planned tensor."""
        expected = self._pending[self._pos]
        if name != expected:
            raise ValueError(f"got {name}, expected {expected}")
        shard = self.files.index(self.file_of[name])
        names = self.shards[shard]
        if names[0] == name:
            self._fh = open(self.folder / self.files[shard], "wb")
            self._fh.write(self._header(names))
        data = tensor.to(torch.bfloat16).contiguous().view(-1).view(torch.uint8).numpy()
        assert self._fh is not None
        self._fh.write(memoryview(data))
        if names[-1] == name:
            self._fh.close()
            self._fh = None
        self._pos += 1

    def finish(self) -> None:
        """Write the index (sharded models only)."""
        if len(self.files) > 1:
            total = sum(2 * _numel(s) for s in self.shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": self.file_of}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def is_built(folder: Path, spec: BuildSpec, role: str) -> bool:
    """Whether ``folder`` holds a finished model of this spec and role."""
    try:
        return json.loads((folder / STAMP).read_text()) == json.loads(json.dumps(spec.stamp(role)))
    except (OSError, json.JSONDecodeError):
        return False


def build_models(root: Path, spec: BuildSpec, fine_tunes: int, log: bool = True) -> dict[str, Path]:
    """Make sure ``root/base`` and ``root/ft1..ftN`` exist for ``spec``; build the missing ones.

    Returns:
        role -> folder, for ``base`` and each fine-tune.
    """
    roles = ["base"] + [f"ft{k}" for k in range(1, fine_tunes + 1)]
    folders = {r: root / r for r in roles}
    missing = [r for r in roles if not is_built(folders[r], spec, r)]
    if not missing:
        return folders
    need = spec.model_bytes * len(missing)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need + 2 * 10**9:
        raise SystemExit(f"not enough disk under {root}: need {need / 1e9:.1f} GB (+2 GB margin), have {free / 1e9:.1f} GB")
    if log:
        print(f"building {', '.join(missing)} ({spec.param_count / 1e9:.2f}B params, "
              f"{need / 1e9:.1f} GB) under {root}", file=sys.stderr, flush=True)
    shapes = spec.shape.tensor_shapes()
    writers: dict[str, StreamingSafetensors] = {}
    for r in missing:
        shutil.rmtree(folders[r], ignore_errors=True)
        folders[r].mkdir(parents=True)
        (folders[r] / "config.json").write_text(json.dumps(spec.shape.config(torch.bfloat16), indent=2))
        (folders[r] / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        writers[r] = StreamingSafetensors(folders[r], shapes)
    for name, shape in shapes.items():
        base = base_tensor(spec, name, shape)
        for r, w in writers.items():
            w.write(name, base if r == "base" else add_delta(spec, base, name, int(r[2:])))
    for r, w in writers.items():
        w.finish()
        (folders[r] / STAMP).write_text(json.dumps(spec.stamp(r), indent=1))
    os.sync()  # so write-back of the new files does not run during the timed runs
    return folders


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder."""
    return sorted(folder.glob("*.safetensors"))
