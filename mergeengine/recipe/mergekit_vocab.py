"""mergekit's ``tokenizer_source`` and ``tokenizer:`` block as ``vocab_align`` steps.

Every model of the merge (base first) gets a ``vocab_align`` step with the same vocabulary
fields; the merge then runs on the aligned models and the save writes the union (or base)
tokenizer. ``tokens`` entries take a model of the config or ``{kind: zero}`` as source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergeengine.recipe.mergekit_methods import ConvertError
from mergeengine.recipe.mergekit_schema import MergekitConfig, ModelReference

YPath = tuple[Any, ...]


def _vocab_fields(config: MergekitConfig, add: Callable[[ModelReference, YPath], str]) -> dict[str, Any] | None:
    """The shared fields of the align steps; None when the config keeps the models' rows as they are."""
    block = config.tokenizer
    source = block.source if block is not None else config.tokenizer_source
    where: YPath = ("tokenizer", "source") if block is not None else ("tokenizer_source",)
    if source is None:
        return None
    if source not in ("union", "base"):
        raise ConvertError(where, "a tokenizer taken from one model has no translation (use union or base)")
    fields: dict[str, Any] = {"source": source}
    if block is not None and block.pad_to_multiple_of:
        fields["pad_to_multiple_of"] = block.pad_to_multiple_of
    tokens = {}
    for token, cfg in ((block.tokens or {}) if block is not None else {}).items():
        at: YPath = ("tokenizer", "tokens", token, "source")
        src = cfg.source
        if isinstance(src, dict) and src.get("kind") == "zero":
            name = "zero"
        elif isinstance(src, str):
            name = add(src, at)
        else:
            raise ConvertError(at, "a token source is a model of the config or {kind: zero}")
        tokens[token] = {"source": name, **({"force": True} if cfg.force else {})}
    if tokens:
        fields["tokens"] = tokens
    return fields


def vocab_steps(config: MergekitConfig, conv: Any, base: str | None, inputs: list[str],
                add: Callable[[ModelReference, YPath], str]) -> tuple[str | None, list[str]]:
    """Append a ``vocab_align`` step per model when the config builds a vocabulary; returns the
    (base, inputs) the merge takes."""
    fields = _vocab_fields(config, add)
    if fields is None:
        return base, inputs
    models = list(dict.fromkeys(([base] if base else []) + inputs))
    aligned = {}
    for sid in models:
        aligned[sid] = f"{sid}_vocab"
        index = len(conv.data["steps"])
        conv.origins[("steps", index)] = ("tokenizer",) if config.tokenizer is not None else ("tokenizer_source",)
        conv.data["steps"].append({"id": aligned[sid], "op": "vocab_align", "model": sid, "models": models, **fields})
        if sid == models[0]:
            conv.comments[index] = [f"vocabulary: {fields['source']} of the models' tokenizers; a token a model "
                                    "lacks takes the only holder's row, the base's, or the holders' mean (mergekit's rule)"]
    return (aligned[base] if base else None), [aligned[s] for s in inputs]
