"""A model with a peft LoRA adapter applied, tensor by tensor: ``W + B·A·scale``.

mergekit writes such a reference as ``model+lora`` (``./base+./adapter``). The adapter folder is
peft's format: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``)
and ``adapter_model.safetensors`` with one ``lora_A`` (r × in) and ``lora_B`` (out × r) pair per
adapted linear layer. The merged model is never materialised: :meth:`LoraCheckpoint.read` reads
the base tensor and, when the adapter has a pair for it, adds ``B @ A × scale`` in float32.

Example:
    >>> ckpt = LoraCheckpoint(base_checkpoint, Path("./adapter"))  # doctest: +SKIP
    >>> ckpt.read("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import Checkpoint, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one adapted weight (tensor names inside the adapter file)."""

    a: str
    b: str


def lora_scale(config: dict[str, Any], module: str = "") -> float:
    """``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``), honouring peft's per-module patterns.

    Args:
        config: the adapter's ``adapter_config.json``.
        module: the module's name (``model.layers.0.self_attn.q_proj``), matched against
            ``rank_pattern`` / ``alpha_pattern`` keys as suffixes.
    """
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _module_of(adapter_name: str) -> tuple[str, str] | None:
    """``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``A``)."""
    for side in ("A", "B"):
        for marker in (f".lora_{side}.weight", f".lora_{side}.default.weight"):
            if adapter_name.endswith(marker):
                module = adapter_name[: -len(marker)]
                return module.removeprefix("base_model.model."), side
    return None


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, LoraPair]]:
    """The adapter's config and its pairs by the base weight they adapt (``<module>.weight``).

    Raises:
        ModelError: missing files, a factor without its partner, or a DoRA/bias adapter.
    """
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelError(f"a LoRA adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}", file=str(folder))
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"not valid JSON: {exc}", file=str(cfg_path)) from None
    if config.get("use_dora"):
        raise ModelError("DoRA adapters (use_dora: true) are not supported, only plain LoRA", file=str(cfg_path))
    if "r" not in config:
        raise ModelError("adapter config has no 'r' (rank)", file=str(cfg_path))
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    sides: dict[str, dict[str, str]] = {}
    for name in names:
        found = _module_of(name)
        if found is None:
            raise ModelError(f"adapter tensor '{name}' is neither a lora_A nor a lora_B weight", file=str(weights))
        sides.setdefault(found[0], {})[found[1]] = name
    pairs: dict[str, LoraPair] = {}
    for module, side in sides.items():
        if set(side) != {"A", "B"}:
            raise ModelError(f"module '{module}' has lora_{''.join(side)} but not its partner", file=str(weights))
        pairs[module + ".weight"] = LoraPair(side["A"], side["B"])
    return config, pairs


class LoraCheckpoint(Checkpoint):
    """``base`` with a LoRA adapter folded into each adapted weight as it is read.

    Headers are the base's (an adapter never changes a shape); ``read`` costs one extra
    ``out × r × in`` matmul per adapted tensor.
    """

    def __init__(self, base: Checkpoint, adapter: Path) -> None:
        self.base = base
        self.adapter = Path(adapter)
        self.source = f"{base.source}+{adapter}"
        self.lora_config, self.pairs = read_adapter(self.adapter)
        infos = base.tensors()
        missing = [n for n in self.pairs if n not in infos]
        if missing:
            raise ModelError(
                f"adapter adapts {len(missing)} weight(s) the model lacks (first: '{missing[0]}')",
                file=str(self.adapter),
            )
        with safe_open(str(self.adapter / ADAPTER_WEIGHTS), framework="pt") as f:
            for name, pair in self.pairs.items():
                self._check_shapes(name, infos[name], f.get_slice(pair.a).get_shape(), f.get_slice(pair.b).get_shape())

    def _check_shapes(self, name: str, info: TensorInfo, a: list[int], b: list[int]) -> None:
        if len(info.shape) != 2 or len(a) != 2 or len(b) != 2 or [b[0], a[1]] != list(info.shape) or a[0] != b[1]:
            raise ModelError(
                f"LoRA factors for '{name}' (A {a}, B {b}) do not fit its shape {list(info.shape)}",
                file=str(self.adapter),
            )

    def tensors(self) -> dict[str, TensorInfo]:
        """The base's tensors (an adapter changes values, not shapes)."""
        return self.base.tensors()

    def read(self, name: str) -> torch.Tensor:
        """The base tensor, plus ``B @ A × scale`` when the adapter adapts it, in the base's dtype."""
        w = self.base.read(name)
        pair = self.pairs.get(name)
        if pair is None:
            return w
        with safe_open(str(self.adapter / ADAPTER_WEIGHTS), framework="pt") as f:
            a, b = f.get_tensor(pair.a).float(), f.get_tensor(pair.b).float()
        scale = lora_scale(self.lora_config, name.removesuffix(".weight"))
        return torch.addmm(w.float(), b, a, alpha=scale).to(w.dtype)

    def config(self) -> dict[str, Any] | None:
        """The base model's config.json."""
        return self.base.config()

    def weight_files(self) -> list[Path]:
        """The base's weight files and the adapter's, with its config (its ``lora_alpha``/``r`` set the
        values too): all are hashed for provenance and for ``--resume``."""
        return [*self.base.weight_files(), self.adapter / ADAPTER_CONFIG, self.adapter / ADAPTER_WEIGHTS]

    def write_support_files(self, dest: Path) -> list[str]:
        """The base model's tokenizer and generation files."""
        return self.base.write_support_files(dest)

    def close(self) -> None:
        """Close the base checkpoint."""
        self.base.close()


def split_lora_reference(model: str) -> tuple[str, str | None]:
    """``"./base+./adapter"`` -> (``"./base"``, ``"./adapter"``); a plain reference -> (model, None).

    mergekit's ``model+lora`` syntax: the last ``+`` separates the adapter. A path that itself
    contains ``+`` and exists is taken as it is by the caller before splitting.
    """
    if "+" not in model:
        return model, None
    base, adapter = model.rsplit("+", 1)
    if not base or not adapter:
        return model, None
    return base, adapter
