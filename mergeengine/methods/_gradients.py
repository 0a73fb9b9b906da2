"""mergekit's per-layer parameter values: filters and gradients, resolved for one tensor.

A value is a number, a gradient (a list of anchors spread evenly over the decoder layers, linearly
interpolated: layer ``i`` of ``L`` sits at ``i / (L − 1)``), or a list of conditions
``{filter: substring, value: number or gradient}`` where the first whose filter occurs in the
tensor's name applies (no filter, or ``"*"``, matches every tensor). Tensors outside the decoder
layers (embeddings, final norm, lm_head) take a gradient's first anchor, as in mergekit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mergeengine.errors import ExecutionError
from mergeengine.ops.base import Reduction

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class Condition(BaseModel):
    """One ``{filter, value}`` entry of a per-layer setting."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    value: float | list[float] = Field(description="A number or a gradient (anchors over the layers).")
    filter: str | None = Field(None, description="Substring of the tensor names it applies to (None or '*': all).")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def parse_setting(value: Any) -> Any:
    """One clear error for a malformed setting (instead of one per member of the union)."""
    if not isinstance(value, list):
        return _number(value)
    if not value:
        raise ValueError("expected a number, a list of numbers (a gradient) or a list of {filter, value}")
    if all(not isinstance(v, dict) for v in value):
        return [_number(v) for v in value]
    conditions = []
    for i, entry in enumerate(value):
        try:
            conditions.append(Condition.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"entry {i}: {where + ': ' if where else ''}{first['msg']}") from None
    return conditions


#: A per-layer setting, as a recipe field's type: a number, a gradient or a list of conditions.
Setting = Annotated[float | list[float] | list[Condition], BeforeValidator(parse_setting)]


def is_layered(setting: Setting) -> bool:
    """Whether the setting depends on the tensor (a gradient or conditions)."""
    return isinstance(setting, list)


def layer_count(name: str, tensors: list[str]) -> Reduction:
    """A reduction that reads no tensor: the number of decoder layers, from the tensor names."""
    layers = [int(m.group(1)) for t in tensors if (m := _LAYER.search(t))]
    return Reduction(name, [], lambda *_: None, lambda acc, stats: max(layers, default=-1) + 1, label="layers")


def _interpolate(anchors: list[float], position: float) -> float:
    scaled = position * (len(anchors) - 1)
    low = int(scaled)
    high = min(len(anchors) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * anchors[low] + frac * anchors[high]


def _position(tensor: str, layers: int) -> float:
    match = _LAYER.search(tensor)
    if match is None or layers <= 1:
        return 0.0
    return int(match.group(1)) / (layers - 1)


def resolve(field: str, setting: Setting, tensor: str, stats: Mapping[str, Any]) -> float:
    """The setting's value for ``tensor`` (``stats["layers"]`` from :func:`layer_count`)."""
    if not isinstance(setting, list):
        return setting
    conditions = setting if setting and isinstance(setting[0], Condition) else [Condition(value=setting)]
    for cond in conditions:
        if cond.filter in (None, "*") or cond.filter in tensor:
            value = cond.value
            if isinstance(value, list):
                return _interpolate(value, _position(tensor, stats["layers"]))
            return value
    raise ExecutionError(f"{field}: no condition matches this tensor; end the list with one without a filter")
