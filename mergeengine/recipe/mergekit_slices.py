"""mergekit's ``slices:`` as ``slices`` steps (passthrough stacks, frankenmerges, merged slices).

A slice with one source is a layer range of that model. A slice with several sources is merged:
each source's range becomes a ``slices`` step of its own (a sub-model of the slice's layers), a
``merge`` step combines them with the config's method and parameters (per-source parameters as
per-model ones, the slice's over the global ones), and the merged sub-model is the slice. A
gradient then runs over the slice's layers, which is mergekit's ``t`` (reset per slice). The
output is one ``slices`` step stacking every slice in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergeengine.recipe.mergekit_methods import ConvertError, MethodSpec, layer_params, merge_fields
from mergeengine.recipe.mergekit_schema import (
    InputModel,
    InputSlice,
    MergekitConfig,
    ModelReference,
    OutputSlice,
)

YPath = tuple[Any, ...]
Add = Callable[[ModelReference, YPath], str]
Align = Callable[[str, int], str]


def _unique(stem: str, taken: set[str]) -> str:
    sid, n = stem, 2
    while sid in taken:
        sid, n = f"{stem}_{n}", n + 1
    taken.add(sid)
    return sid


def _append(conv: Any, step: dict[str, Any], where: YPath, notes: list[str] | None = None) -> None:
    index = len(conv.data["steps"])
    conv.origins[("steps", index)] = where
    conv.data["steps"].append(step)
    if notes:
        conv.comments[index] = notes


def _same(a: ModelReference, b: ModelReference | None) -> bool:
    return b is not None and (a if isinstance(a, str) else a.model_dump()) == (b if isinstance(b, str) else b.model_dump())


def _merged_slice(config: MergekitConfig, spec: MethodSpec, conv: Any, add: Add, taken: set[str], k: int,
                  sl: OutputSlice, align: Align) -> dict[str, Any]:
    """The sub-model steps and the merge of one multi-source slice; returns the output slice entry."""
    where: YPath = ("slices", k)
    if spec.ours == "passthrough":
        raise ConvertError((*where, "sources"), "passthrough takes one source per slice")
    lengths = {b - a for a, b in (s.layer_range for s in sl.sources)}
    if len(lengths) != 1:
        raise ConvertError((*where, "sources"), "every source of a slice must span the same number of layers")
    base_ref = sl.base_model or config.base_model
    subs, base_sub = [], None
    for j, src in enumerate(sl.sources):
        loaded = add(src.model, (*where, "sources", j, "model"))
        model = align(loaded, k)
        sub = _unique(f"{loaded}_{src.layer_range[0]}_{src.layer_range[1]}", taken)
        _append(conv, {"id": sub, "op": "slices", "slices": [{"model": model, "layer_range": list(src.layer_range)}]},
                (*where, "sources", j))
        subs.append(sub)
        if _same(src.model, base_ref):
            base_sub = sub
    if spec.needs_base and base_sub is None:
        raise ConvertError((*where, "sources"), f"{config.merge_method} needs the base model among the slice's sources")
    part = config.model_copy(update={
        "slices": None,
        "models": [InputModel(model=s.model, parameters=s.parameters) for s in sl.sources],
        "parameters": layer_params(sl.parameters, config.parameters),
    })
    fields, notes, origins = merge_fields(spec, part, base_sub, subs)
    merge_id = _unique(f"slice{k}", taken)
    index = len(conv.data["steps"])
    _append(conv, {"id": merge_id, "op": "merge", "method": spec.ours, **fields}, where,
            [f"slice {k}: mergekit's gradients run over this slice's {lengths.pop()} layers, as here", *notes])
    for path, origin in origins.items():
        mapped = (*where, "sources", *origin[1:]) if origin[0] == "models" else origin
        conv.origins[("steps", index, *path)] = mapped
    return {"model": merge_id, "layer_range": [0, sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]]}


def _single(sl: OutputSlice, k: int, add: Add, align: Align) -> dict[str, Any]:
    src: InputSlice = sl.sources[0]
    if src.parameters:
        raise ConvertError(("slices", k, "sources", 0, "parameters"), "a slice of one source takes no parameters")
    if sl.base_model is not None:
        raise ConvertError(("slices", k, "base_model"), "a slice's own 'base_model' is not supported")
    return {"model": align(add(src.model, ("slices", k, "sources", 0, "model")), k), "layer_range": list(src.layer_range)}


def convert_slices(config: MergekitConfig, spec: MethodSpec, conv: Any, add: Add, taken: set[str],
                   align: Align | None = None) -> tuple[str, str]:
    """Append the steps of a ``slices`` config; returns (origin load step id, final step id).

    ``align(load step, slice index)`` is the step a slice takes the model from (a ``vocab_align``
    step where the config builds a vocabulary; default: the load step itself).

    Raises:
        ConvertError: a slice that cannot be translated (named by its position).
    """
    base = add(config.base_model, ("base_model",)) if config.base_model is not None else None
    align = align or (lambda sid, _k: sid)
    out = []
    for k, sl in enumerate(config.slices or []):
        out.append(_single(sl, k, add, align) if len(sl.sources) == 1
                   else _merged_slice(config, spec, conv, add, taken, k, sl, align))
    final = _unique("stack", taken)
    notes = ["layers renumbered in order; embeddings from the first slice's model, final norm and lm_head from the "
             "last's; config.json from the first slice's model, num_hidden_layers set"]
    unused = [k for k, sl in enumerate(config.slices or []) if sl.residual_weight is not None]
    if unused:
        notes.append(f"residual_weight of slice(s) {', '.join(map(str, unused))}: declared in mergekit's schema but "
                     "read nowhere in mergekit 0.1.5 (no effect there), so none here")
    _append(conv, {"id": final, "op": "slices", "slices": out}, ("slices",), notes)
    first = (config.slices or [])[0]
    merged_first = len(first.sources) > 1 and spec.needs_base and base is not None
    origin = base if merged_first else add(first.sources[0].model, ("slices", 0))
    return origin, final  # type: ignore[return-value]
