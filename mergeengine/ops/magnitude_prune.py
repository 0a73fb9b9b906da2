"""``magnitude_prune``: keep each tensor's top-``density`` entries by magnitude (the baseline DP improves on).

```yaml
- {id: m_math, op: magnitude_prune, input: d_math, density: 0.2}
```

``prune_rule: release`` uses the DPPA release's threshold instead (:mod:`mergeengine.kernels.prune_rule`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.dp_density import dp_prune_tensor
from mergeengine.kernels.sparsify import magnitude_prune
from mergeengine.ops import register
from mergeengine.ops.base import StepPlan, TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep, Scope


class MagnitudePruneStep(DeltaStep):
    """Per-tensor top-k by |delta|; no rescaling."""

    op: Literal["magnitude_prune"]
    density: float = Field(gt=0, le=1, description="Keep fraction per tensor (k = round(density * numel)).")
    scope: Scope = Field("all", description="all tensors (as mergekit), or decoder_linear (the tensors DP prunes).")
    prune_rule: Literal["exact", "release"] = Field(
        "exact", description="exact: top round(density * numel), ties by index; release: the DPPA release's "
        "threshold sort(|W|)[int(numel * (1 - d))], pruning every |W| <= it.")


@register
class MagnitudePrune(DeltaOp):
    """Exact top-k selection (bit-histogram), ties broken by index."""

    compute_bound = True
    name = "magnitude_prune"
    Step = MagnitudePruneStep
    step: MagnitudePruneStep

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if not self.in_scope(ctx.plan, ctx.tensor, self.step.scope):
            return inputs[0]
        if self.step.prune_rule == "release":
            return dp_prune_tensor(inputs[0].float(), self.step.density, "release")
        return magnitude_prune(inputs[0], self.step.density)

    def plan_notes(self, plan: StepPlan) -> list[str]:
        return self.group_notes(plan) if self.step.scope == "decoder_linear" else []
