"""Vocabulary mismatches: a fine-tune with extra embedding / lm_head rows relative to its base."""

from __future__ import annotations

import re

import torch

from mergeengine.errors import ShapeError
from mergeengine.ops.base import TensorMeta
from mergeengine.recipe.step import VocabPolicy

__all__ = ["VocabPolicy", "align_vocab", "aligned_meta", "is_vocab_tensor", "pad_rows", "vocab_shapes"]

# Tensors whose first dimension is the vocabulary (Llama, GPT-2, BERT, GPT-NeoX names).
VOCAB_TENSOR = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out)\b")


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is an embedding or output head (rows = vocabulary)."""
    return bool(VOCAB_TENSOR.search(name))


def vocab_shapes(
    step: str,
    policy: VocabPolicy,
    model: dict[str, TensorMeta],
    base: dict[str, TensorMeta],
    model_id: str,
    base_id: str,
) -> dict[str, tuple[int, int]]:
    """Find tensors whose shapes differ only in the number of rows (vocabulary size).

    Returns:
        name -> (model rows, base rows) for each such tensor.

    Raises:
        ShapeError: rows differ and ``policy`` is ``error``, or the model has *fewer* rows than
            the base under ``pad_base`` (nothing to pad).
    """
    rows: dict[str, tuple[int, int]] = {}
    for name, m in model.items():
        b = base.get(name)
        if b is None or b.shape == m.shape or not is_vocab_tensor(name) or m.shape[1:] != b.shape[1:]:
            continue
        rows[name] = (m.shape[0], b.shape[0])
    if not rows:
        return rows
    shown = "; ".join(
        f"'{n}' {list(model[n].shape)} in '{model_id}' vs {list(base[n].shape)} in '{base_id}'" for n in rows
    )
    if policy == "error":
        raise ShapeError(
            f"vocabulary sizes differ: {shown}. Set 'vocab: truncate' (drop the extra rows) or "
            "'vocab: pad_base' (zero rows added to the base) on this step",
            step=step,
        )
    return rows


def align_vocab(policy: VocabPolicy, model: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``model`` and ``base`` the same number of rows according to ``policy``."""
    if policy == "truncate":
        n = min(model.shape[0], base.shape[0])
        return model[:n], base[:n]
    return model, pad_rows(base, model.shape[0])


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad (or truncate) ``t`` to ``rows`` rows."""
    if t.shape[0] >= rows:
        return t[:rows]
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def aligned_meta(policy: VocabPolicy, model: TensorMeta, base: TensorMeta) -> TensorMeta:
    """Shape of the aligned pair: the base's under truncate (if smaller), the model's under pad_base."""
    if policy == "truncate":
        return base if base.shape[0] <= model.shape[0] else model
    return model if model.shape[0] >= base.shape[0] else base
