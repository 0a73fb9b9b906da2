"""``slices``: a model assembled from layer ranges of other models (passthrough, frankenmerges).

```yaml
- id: stack
  op: slices
  slices:
    - {model: a, layer_range: [0, 16]}
    - {model: b, layer_range: [8, 24]}
```

Output layer ``j`` is layer ``start + i`` of its slice's model, renumbered; ``num_hidden_layers``
(and the per-layer lists of config.json) follow. Tensors outside the layers come from the first
slice's model (embeddings) and the last slice's (final norm, lm_head), as in mergekit. A layer
used twice is written once per position and read again for its second position rather than held
in memory (the planner computes a value once per output tensor that needs it). To merge inside a slice, merge the sliced models
first (a ``slices`` step per source, then a ``merge`` of them: a gradient then runs over the
slice's layers, as mergekit's does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeengine.errors import ShapeError
from mergeengine.ops import register
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TaskContext, TensorMeta
from mergeengine.recipe.schedule import LAYER_INDEX, num_layers_of

_PRE = re.compile(r"embed|wte|wpe")  # tensors before the layers; the others (norms, lm_head) come after


class Slice(BaseModel):
    """Layers ``[start, end)`` of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Step id of the model the layers come from.")
    layer_range: tuple[int, int] = Field(description="[start, end): the layers taken, end exclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> Slice:
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError(f"layer_range [{start}, {end}] must satisfy 0 <= start < end")
        return self


class SlicesStep(StepModel):
    """Stack layer ranges of models into one model."""

    op: Literal["slices"]
    slices: list[Slice] = Field(min_length=1, description="Layer ranges, in output order.")


def _rename(name: str, layer: int) -> str:
    return LAYER_INDEX.sub(f".layers.{layer}.", "." + name, count=1)[1:]


@register
class SlicesOp(Op):
    """Per output tensor: the source model's tensor of the mapped layer, unchanged."""

    name = "slices"
    Step = SlicesStep
    step: SlicesStep

    def references(self) -> dict[str, list[str]]:
        return {"slices": [s.model for s in self.step.slices]}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        bad = [s.model for s in self.step.slices if s.model in kinds and kinds[s.model].kind != "model"]
        if bad:
            return None, [("slices", f"'{bad[0]}' is a {kinds[bad[0]].kind}; slices take models")]
        first = self.step.slices[0].model
        return (StepKind("model", origin=kinds[first].origin) if first in kinds else None), []

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """The renumbered layers' tensors; ``details``: output name -> (step, source name), and the
        source and output layer counts (for :meth:`adjust_config`)."""
        mapping: dict[str, tuple[str, str]] = {}  # output name -> (step, source name)
        out: dict[str, TensorMeta] = {}
        layer = 0
        for s in self.step.slices:
            metas = inputs.metas[s.model]
            have = num_layers_of(list(metas))
            if s.layer_range[1] > have:
                raise ShapeError(f"slice {list(s.layer_range)} of '{s.model}': it has {have} layers", step=self.step.id)
            for src_layer in range(*s.layer_range):
                for name, meta in metas.items():
                    m = LAYER_INDEX.search("." + name)
                    if m is not None and int(m.group(1)) == src_layer:
                        out[_rename(name, layer)] = meta
                        mapping[_rename(name, layer)] = (s.model, name)
                layer += 1
        self._outside(inputs.metas, out, mapping)
        details = {"map": mapping, "num_layers": layer,
                   "source_layers": num_layers_of(list(inputs.metas[self.step.slices[0].model]))}
        return StepPlan(out, inputs.kinds[self.step.id], details=details)

    def _outside(self, inputs: Mapping[str, Mapping[str, TensorMeta]], out: dict[str, TensorMeta],
                 mapping: dict[str, tuple[str, str]]) -> None:
        """Embeddings from the first slice's model, the other non-layer tensors from the last's."""
        first, last = self.step.slices[0].model, self.step.slices[-1].model
        for step in dict.fromkeys([first, last]):
            for name, meta in inputs[step].items():
                pre = bool(_PRE.search(name))
                if LAYER_INDEX.search("." + name) is None and step == (first if pre else last):
                    out[name] = meta
                    mapping[name] = (step, name)

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        return [plan.details["map"][name]]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        return inputs[0]

    def adjust_config(self, plan: StepPlan, config: dict[str, Any]) -> dict[str, Any]:
        """``num_hidden_layers`` and per-layer lists (e.g. ``layer_types``) for the stacked layers."""
        out = dict(config)
        source_layers = plan.details["source_layers"]
        layers = [src for s in self.step.slices for src in range(*s.layer_range)]
        for key, value in config.items():
            if isinstance(value, list) and len(value) == source_layers and source_layers > 1:
                out[key] = [value[i] if i < len(value) else value[-1] for i in layers]
        out["num_hidden_layers"] = plan.details["num_layers"]
        return out
