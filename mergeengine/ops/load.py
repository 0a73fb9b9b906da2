"""``load``: a model from a folder, a safetensors file, a GGUF file or the hub.

```yaml
- {id: base, op: load, model: ./models/base}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from mergeengine.ops import register
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TaskContext, TensorMeta
from mergeengine.recipe.step import PathText


class LoadStep(StepModel):
    """Read a model lazily; tensors are read one at a time when the plan needs them."""

    op: Literal["load"]
    model: PathText = Field(min_length=1, description="Folder, .safetensors/.gguf file, or hub repo id.")
    revision: PathText | None = Field(None, description="Hub revision (branch, tag or commit).")
    allow_pickle: bool = Field(False, description="Allow PyTorch .bin checkpoints (read with weights_only=True).")


@register
class LoadOp(Op):
    """Produces the model's tensors in their stored dtype."""

    name = "load"
    Step = LoadStep
    step: LoadStep

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind, list[tuple[str, str]]]:
        return StepKind("model", origin=self.step.id), []

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """The checkpoint's tensors; the opened checkpoint travels in ``details``."""
        metas = {n: TensorMeta(i.shape, i.dtype) for n, i in inputs.checkpoint.tensors().items()}
        return StepPlan(metas, inputs.kinds[self.step.id], details={"checkpoint": inputs.checkpoint})

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        return []

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        return ctx.plan.details["checkpoint"].read(ctx.tensor).to(ctx.device)
