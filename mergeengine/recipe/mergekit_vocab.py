"""mergekit's ``tokenizer_source`` and ``tokenizer:`` block as ``vocab_align`` steps.

Every model whose embedding or lm_head rows reach the output gets a ``vocab_align`` step with
the same vocabulary fields (``models``: every model of the config, base first; ``source``:
``union``, ``base`` or the model whose tokenizer is taken, which need not be merged); the merge then runs on the aligned
models and the save writes the output tokenizer. ``fill_from`` is the set mergekit fills a
missing row from: the models merged into that tensor (with ``models``: all of them; with
``slices``: the first slice's sources for the embeddings, the last slice's for lm_head); the base
model's row is preferred (``base_first``) where the base is one of them. ``tokens`` entries
take a model of the config, ``{kind: zero}`` or ``{kind: model_token, model, token | token_id}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergeengine.recipe.mergekit_methods import ConvertError
from mergeengine.recipe.mergekit_schema import MergekitConfig, ModelReference, ModelReferenceSpec

YPath = tuple[Any, ...]
Add = Callable[[ModelReference, YPath], str]


def _where(config: MergekitConfig) -> YPath:
    return ("tokenizer", "source") if config.tokenizer is not None else ("tokenizer_source",)


def _ref(value: Any) -> ModelReference:
    return value if isinstance(value, (str, ModelReferenceSpec)) else ModelReferenceSpec.model_validate(value)


def _token_source(src: Any, add: Add, at: YPath) -> Any:
    """A ``tokens`` entry's source as ``vocab_align`` takes it."""
    if isinstance(src, dict) and src.get("kind") == "zero" and len(src) == 1:
        return "zero"
    if isinstance(src, dict) and src.get("kind") == "model_token":
        keys = set(src) - {"kind", "model"}
        if "model" not in src or len(keys) != 1 or not keys <= {"token", "token_id"}:
            raise ConvertError(at, "a model_token source takes 'model' and one of 'token', 'token_id'")
        key = keys.pop()
        return {"model": add(_ref(src["model"]), (*at, "model")), key: src[key]}
    if isinstance(src, (str, dict)) and not (isinstance(src, dict) and "kind" in src):
        return add(_ref(src), at)
    raise ConvertError(at, "a token source is a model of the config, {kind: zero} or {kind: model_token, model, token}")


def vocab_fields(config: MergekitConfig, add: Add) -> dict[str, Any] | None:
    """The shared fields of the align steps; None when the config keeps the models' rows as they are."""
    block = config.tokenizer
    source = block.source if block is not None else config.tokenizer_source
    if source is None:
        return None
    fields: dict[str, Any] = {"source": source if source in ("union", "base") else add(source, _where(config))}
    if block is not None and block.pad_to_multiple_of:
        fields["pad_to_multiple_of"] = block.pad_to_multiple_of
    tokens = {}
    for token, cfg in ((block.tokens or {}) if block is not None else {}).items():
        name = _token_source(cfg.source, add, ("tokenizer", "tokens", token, "source"))
        tokens[token] = {"source": name, **({"force": True} if cfg.force else {})}
    if tokens:
        fields["tokens"] = tokens
    return fields


class Aligner:
    """Appends the ``vocab_align`` step of a (model, fill set) once; returns its id."""

    def __init__(self, config: MergekitConfig, conv: Any, models: list[str], fields: dict[str, Any],
                 taken: set[str]) -> None:
        named = [t["source"]["model"] if isinstance(t["source"], dict) else t["source"]
                 for t in fields.get("tokens", {}).values()]
        for i, model in enumerate(named):
            if model != "zero" and model not in models:
                token = list(fields["tokens"])[i]
                raise ConvertError(("tokenizer", "tokens", token, "source"), "the source must be a model of the merge")
        self.config, self.conv, self.models, self.fields, self.taken = config, conv, models, fields, taken
        self.done: dict[tuple[str, tuple[str, ...], bool], str] = {}

    def __call__(self, sid: str, fill: list[str] | None = None, base_first: bool = True) -> str:
        """The align step of load step ``sid`` filling from ``fill`` (default: every model)."""
        key = (sid, tuple(fill or self.models), base_first)
        if key in self.done:
            return self.done[key]
        aligned, n = f"{sid}_vocab", 2
        while aligned in self.taken:
            aligned, n = f"{sid}_vocab_{n}", n + 1
        self.taken.add(aligned)
        step: dict[str, Any] = {"id": aligned, "op": "vocab_align", "model": sid, "models": self.models, **self.fields}
        if fill is not None and list(fill) != self.models:
            step["fill_from"] = list(fill)
        if not base_first:
            step["base_first"] = False
        index = len(self.conv.data["steps"])
        self.conv.origins[("steps", index)] = ("tokenizer",) if self.config.tokenizer is not None else ("tokenizer_source",)
        self.conv.data["steps"].append(step)
        if not self.done:
            self.conv.comments[index] = [f"vocabulary: {self.fields['source']} of the models' tokenizers; a token a model "
                                         "lacks takes the only holder's row, the base's, or the holders' mean (mergekit's "
                                         "rule over the models merged into the tensor)"]
        self.done[key] = aligned
        return aligned


def vocab_steps(config: MergekitConfig, conv: Any, base: str | None, inputs: list[str], add: Add,
                taken: set[str]) -> tuple[str | None, list[str]]:
    """Append a ``vocab_align`` step per model when the config builds a vocabulary; returns the
    (base, inputs) the merge takes."""
    fields = vocab_fields(config, add)
    if fields is None:
        return base, inputs
    merged = list(dict.fromkeys(([base] if base else []) + inputs))
    models = _with_source(merged, fields)
    align = Aligner(config, conv, models, fields, taken)
    fill = merged if models != merged else None  # a tokenizer-only model gives no rows
    first = base is not None  # mergekit prefers the base model's row; without one, no model is preferred
    return (align(base, fill, first) if base else None), [align(s, fill, first) for s in inputs]


def _with_source(models: list[str], fields: dict[str, Any]) -> list[str]:
    """The vocabulary's models: those merged, then the model whose tokenizer is taken if it is not merged."""
    source = fields["source"]
    return models if source in ("union", "base", *models) else [*models, source]


def slice_aligner(config: MergekitConfig, conv: Any, add: Add, taken: set[str]) -> Callable[[str, int], str] | None:
    """For a ``slices`` config that builds a vocabulary: ``align(load step, slice index)``, the step a slice
    takes a model from. The first slice's sources give the embeddings, the last slice's lm_head: their
    models are aligned with the slice's sources as the fill set (the slice's base first where it is
    one of them); middle slices' layers are unchanged. None when the config keeps the models' rows
    as they are."""
    fields = vocab_fields(config, add)
    if fields is None:
        return None
    slices = config.slices or []
    base = add(config.base_model, ("base_model",)) if config.base_model is not None else None
    loads = [add(src.model, ("slices", k, "sources", j, "model"))
             for k, sl in enumerate(slices) for j, src in enumerate(sl.sources)]
    loads += [add(sl.base_model, ("slices", k, "base_model")) for k, sl in enumerate(slices) if sl.base_model is not None]
    models = _with_source(list(dict.fromkeys(([base] if base else []) + loads)), fields)
    aligner = Aligner(config, conv, models, fields, taken)

    def align(sid: str, k: int) -> str:
        if k not in (0, len(slices) - 1):
            return sid
        sl = slices[k]
        own_base = add(sl.base_model, ("slices", k, "base_model")) if sl.base_model is not None else base
        sources = [add(s.model, ()) for s in sl.sources]
        first = own_base in sources  # mergekit prefers the base's row only where the base is merged into the tensor
        fill = list(dict.fromkeys(([own_base] if first else []) + sources))
        return aligner(sid, fill, first)

    return align
