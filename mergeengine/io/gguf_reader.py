"""Lazy reader for GGUF files (llama.cpp's format): Hugging Face names, float32 tensors.

A GGUF file holds the weights (often quantized), the model hyperparameters and the tokenizer as
metadata. :class:`GGUFCheckpoint` presents it as if it were a Hugging Face model folder: tensor
names and shapes in transformers' layout, one tensor dequantized to float32 per :meth:`read`, a
``config.json`` dict and tokenizer files built from the metadata.

Only the Llama family (``general.architecture == "llama"``, e.g. Llama 2, SmolLM2) is mapped so far;
adding an architecture means a name table and a config builder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import Checkpoint, TensorInfo

LOG = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF name -> Hugging Face name for tensors outside the blocks, in HF state-dict order.
_LLAMA_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# blk.N.<key> -> model.layers.N.<value>, in the order LlamaDecoderLayer registers its parameters.
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Llama q or k projection (weight or bias).

    llama.cpp's ``convert_hf_to_gguf.py`` reorders each head's rows from Hugging Face's
    "rotate_half" layout (first half / second half of the head dim) to the interleaved pairs its
    RoPE kernel expects: ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. This is the exact
    inverse (a pure reordering, so it is lossless).

    Args:
        weight: the tensor as stored in the GGUF, rows first (HF orientation).
        n_head: heads the rows are split into: ``num_attention_heads`` for q,
            ``num_key_value_heads`` for k.

    Returns:
        The tensor in Hugging Face row order, same shape.

    Raises:
        ValueError: the row count is not a multiple of ``2 * n_head``.
    """
    rows = weight.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _field_value(field: Any) -> Any:
    """A ``gguf.ReaderField``'s value as a Python scalar, string or list.

    Written against the stable ``types``/``parts``/``data`` attributes rather than
    ``ReaderField.contents()``, which older gguf releases lack.
    """
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def _tidy_float(value: float) -> float:
    """The shortest decimal that round-trips through float32.

    GGUF stores floats as float32, so ``1e-5`` comes back as ``9.999999747378752e-06``; the
    original config said ``1e-05``, and float32 cannot tell the two apart.
    """
    return float(str(np.float32(value)))


def _supported_quant_types() -> set[Any]:
    """GGML tensor types ``gguf.quants.dequantize`` can turn into float32."""
    from gguf import GGMLQuantizationType, quants

    # `_type_traits` is gguf's registry of block formats it can dequantize; F32/F16 are special-cased.
    traits = getattr(quants, "_type_traits", {})
    return {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *traits}


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file read as a Hugging Face model, one dequantized tensor at a time.

    The file is memory-mapped; opening it parses the metadata and tensor headers only.
    Every tensor is presented as float32 whatever its quantization.

    Args:
        path: the ``.gguf`` file.

    Raises:
        ModelError: the file is missing or not GGUF, or its architecture, a tensor or a quantization
            type is unsupported.

    Example:
        >>> ckpt = GGUFCheckpoint(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
        >>> ckpt.tensors()["model.layers.0.self_attn.k_proj.weight"].shape  # doctest: +SKIP
        (192, 576)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        try:
            import gguf
        except ImportError:
            raise ModelError(
                "reading GGUF files needs the 'gguf' package (pip install 'mergeengine[gguf]')",
                file=self.source,
            ) from None
        if not self.path.is_file():
            raise ModelError("GGUF file not found", file=self.source)
        try:
            self._reader: Any = gguf.GGUFReader(str(self.path), "r")
        except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
            raise ModelError(
                f"not a readable GGUF file ({type(exc).__name__}: {exc})", file=self.source
            ) from None
        self.architecture = str(self._meta("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"unsupported GGUF architecture '{self.architecture or '?'}' "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
                file=self.source,
            )
        self._check_attention()
        self.n_head = int(self._arch_meta("attention.head_count", 0))
        self.n_head_kv = int(self._arch_meta("attention.head_count_kv", self.n_head))
        self._gguf_tensor: dict[str, Any] = {}  # HF name -> gguf ReaderTensor
        self._infos: dict[str, TensorInfo] = {}
        self._map_tensors()

    # ------------------------------------------------------------------ metadata helpers

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else _field_value(field)

    def _arch_meta(self, key: str, default: Any = None) -> Any:
        return self._meta(f"{self.architecture}.{key}", default)

    def _check_attention(self) -> None:
        """Refuse attention settings the config builder cannot express (they would load but compute wrong)."""
        scaling = self._arch_meta("rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ModelError(
                f"unsupported GGUF rope scaling '{scaling}' (only unscaled RoPE)", file=self.source
            )
        heads = self._arch_meta("attention.head_count")
        if not isinstance(heads, int) or heads <= 0:
            raise ModelError("GGUF metadata lacks a scalar attention.head_count", file=self.source)
        if isinstance(self._arch_meta("attention.head_count_kv"), list):
            raise ModelError("unsupported GGUF: per-layer key/value head counts", file=self.source)

    # ------------------------------------------------------------------ tensor headers

    def _hf_name(self, gguf_name: str) -> tuple[str, tuple[int, int, int, bool]] | None:
        """HF name and a sort key (HF state-dict order) for a GGUF tensor name, or None if unknown."""
        if m := _BLOCK_RE.match(gguf_name):
            layer, part, kind = int(m[1]), m[2], m[3]
            if part not in _LLAMA_BLOCK:
                return None
            key = (1, layer, list(_LLAMA_BLOCK).index(part), kind == "bias")
            return f"model.layers.{layer}.{_LLAMA_BLOCK[part]}.{kind}", key
        if m := _GLOBAL_RE.match(gguf_name):
            part, kind = m[1], m[2]
            if part not in _LLAMA_GLOBAL:
                return None
            # embeddings first, the blocks (group 1), then the final norm and the head
            key = ({"token_embd": 0, "output_norm": 2, "output": 3}[part], 0, 0, kind == "bias")
            return f"{_LLAMA_GLOBAL[part]}.{kind}", key
        return None

    def _map_tensors(self) -> None:
        supported = _supported_quant_types()
        entries = []
        for t in self._reader.tensors:
            mapped = self._hf_name(t.name)
            if mapped is None:
                hint = " (Llama 3 rope scaling is not supported)" if t.name.startswith("rope_freqs") else ""
                raise ModelError(
                    f"unsupported GGUF tensor '{t.name}': no Hugging Face {self.architecture} equivalent{hint}",
                    file=self.source,
                )
            if t.tensor_type not in supported:
                raise ModelError(
                    f"unsupported GGUF quantization type {t.tensor_type.name} (tensor '{t.name}')",
                    file=self.source,
                )
            name, key = mapped
            if name in self._gguf_tensor:
                raise ModelError(f"GGUF tensor '{t.name}' appears twice", file=self.source)
            # GGUF lists dimensions fastest-varying first (ggml's ne[]); torch lists them slowest first.
            shape = tuple(int(d) for d in reversed(list(t.shape)))
            self._gguf_tensor[name] = t
            entries.append((key, name, shape))
        if "model.embed_tokens.weight" not in self._gguf_tensor:
            raise ModelError("GGUF file has no token_embd.weight (not a complete model?)", file=self.source)
        for _, name, shape in sorted(entries):
            self._infos[name] = TensorInfo(shape, torch.float32, self.source)

    def tensors(self) -> dict[str, TensorInfo]:
        """Hugging Face names -> header information, in HF state-dict order. Reads no tensor data.

        Returns:
            Name -> :class:`TensorInfo` (HF shape, dtype float32, this file). Tied-embedding models
            have no ``lm_head.weight``.
        """
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32 in Hugging Face layout.

        Args:
            name: a Hugging Face tensor name from :meth:`tensors`.

        Returns:
            A float32 CPU tensor of the shape :meth:`tensors` gives, owning its memory (not a view
            of the memory map).

        Raises:
            ModelError: unknown name, or the data cannot be dequantized.
        """
        from gguf import quants

        if self._reader is None:
            raise ModelError("checkpoint is closed", tensor=name, file=self.source)
        t = self._gguf_tensor.get(name)
        if t is None:
            raise ModelError(f"tensor '{name}' not in checkpoint", file=self.source)
        shape = self._infos[name].shape
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelError(
                f"cannot dequantize {t.tensor_type.name}: {exc}", tensor=name, file=self.source
            ) from None
        if np.may_share_memory(arr, t.data):
            # F32 "dequantizes" to a view of the read-only memory map; callers expect their own memory.
            arr = arr.copy()
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)
        try:
            if ".self_attn.q_proj." in name:
                out = unpermute_qk(out, self.n_head)
            elif ".self_attn.k_proj." in name:
                out = unpermute_qk(out, self.n_head_kv)
        except ValueError as exc:
            raise ModelError(
                f"cannot undo llama.cpp's q/k permutation: {exc}", tensor=name, file=self.source
            ) from None
        return out

    # ------------------------------------------------------------------ config and support files

    def config(self) -> dict[str, Any]:
        """A Hugging Face ``LlamaConfig``-style ``config.json`` dict built from the GGUF metadata.

        Returns:
            The config dict (``architectures``, ``model_type``, sizes, RoPE and norm settings,
            special token ids, ``tie_word_embeddings``, ``torch_dtype: float32``).
        """
        vocab_rows = self._infos["model.embed_tokens.weight"].shape[0]
        hidden = int(self._arch_meta("embedding_length", self._infos["model.embed_tokens.weight"].shape[1]))
        head_dim = int(self._arch_meta("attention.key_length", hidden // max(self.n_head, 1)))
        has_bias = "model.layers.0.self_attn.q_proj.bias" in self._infos
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_meta("feed_forward_length", 0)),
            "num_hidden_layers": int(self._arch_meta("block_count", 0)),
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _tidy_float(self._arch_meta("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _tidy_float(self._arch_meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_meta("context_length", 2048)),
            # the embedding matrix is the ground truth; metadata vocab_size is missing in older files
            "vocab_size": vocab_rows,
            "attention_bias": has_bias,
            "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._infos,
            # llama.cpp drops output.weight when the head shares the embedding matrix
            "tie_word_embeddings": "lm_head.weight" not in self._infos,
            "torch_dtype": "float32",
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = self._meta(f"tokenizer.ggml.{key.replace('pad_', 'padding_')}")
            if value is not None:
                cfg[key] = int(value)
        return cfg

    def weight_files(self) -> list[Path]:
        """The files tensor data is read from.

        Returns:
            ``[path]``: a GGUF model is one file.
        """
        return [self.path]

    def write_support_files(self, dest: Path) -> list[str]:
        """Write ``generation_config.json`` and the tokenizer files built from the GGUF metadata.

        The tokenizer is converted by transformers' own GGUF support (``AutoTokenizer`` with
        ``gguf_file=``) and saved with ``save_pretrained``; without transformers, or if the
        conversion fails, only ``generation_config.json`` is written and a warning is logged.

        Args:
            dest: the output folder (created if missing).

        Returns:
            Names of the files written, relative to ``dest``.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        gen: dict[str, Any] = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = self._meta(f"tokenizer.ggml.{key.replace('pad_', 'padding_')}")
            if value is not None:
                gen[key] = int(value)
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        return ["generation_config.json", *self._write_tokenizer(dest)]

    def _write_tokenizer(self, dest: Path) -> list[str]:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            LOG.warning("%s: transformers is not installed; no tokenizer files written", self.source)
            return []
        with tempfile.TemporaryDirectory() as tmp:
            # A folder holding only the GGUF, so tokenizer files lying next to the original file
            # cannot take precedence over the metadata.
            folder, name = Path(tmp), "model.gguf"
            try:
                os.symlink(self.path.resolve(), folder / name)
            except OSError:  # no symlinks (e.g. Windows without privilege): use the real folder
                folder, name = self.path.parent, self.path.name
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    str(folder),
                    gguf_file=name,
                    local_files_only=True,
                    model_max_length=int(self._arch_meta("context_length", 2048)),
                )
            except (ValueError, KeyError, OSError, ImportError, NotImplementedError) as exc:
                LOG.warning(
                    "%s: cannot build a tokenizer from GGUF metadata (%s); none written", self.source, exc
                )
                return []
        saved = tokenizer.save_pretrained(str(dest))
        self._clean_tokenizer_config(dest / "tokenizer_config.json")
        return [Path(p).name for p in saved if Path(p).is_file()]

    @staticmethod
    def _clean_tokenizer_config(path: Path) -> None:
        """Drop loading kwargs transformers echoes into tokenizer_config.json; they mean nothing to readers."""
        if not path.is_file():
            return
        cfg = json.loads(path.read_text())
        dropped = [cfg.pop(key) for key in ("local_files_only", "is_local", "gguf_file") if key in cfg]
        if dropped:
            path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Drop the reader and its memory map (tensors already returned by :meth:`read` stay valid)."""
        self._gguf_tensor.clear()
        self._reader = None
