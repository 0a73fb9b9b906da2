"""``dp_prune``: DPPA's Dynamic Pruning (docs/recipes.md, "dp_prune").

Magnitude pruning of a delta with a keep fraction that varies per decoder layer and per linear
module according to their outlier ratios. Embeddings, norms and lm_head pass through dense.

```yaml
- {id: p_math, op: dp_prune, input: d_math, density: 0.2, lamda: 0.08, module_threshold: 5, layer_threshold: 3}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergeengine.kernels import dppa
from mergeengine.ops import register
from mergeengine.ops.base import Reduction, StepPlan, TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep
from mergeengine.ops.dp_stats import (
    Lamda,
    LayerThreshold,
    ModuleThreshold,
    density_report,
    dp_reductions,
    log_summary,
)


class DpPruneStep(DeltaStep):
    """DP parameters; defaults are the release's."""

    op: Literal["dp_prune"]
    density: float = Field(gt=0, le=1, description="Target keep fraction d.")
    lamda: float = Lamda
    module_threshold: float = ModuleThreshold
    layer_threshold: float = LayerThreshold


@register
class DpPrune(DeltaOp):
    """Two statistics passes (magnitude sums, then module and layer outlier counts), then per-tensor pruning."""

    compute_bound = True
    name = "dp_prune"
    fuses_diff = True
    Step = DpPruneStep
    step: DpPruneStep

    def reductions(self, plan: StepPlan) -> list[Reduction]:
        s = self.step
        return dp_reductions(s.id, dict(plan.groups), [s.density], lamda=s.lamda,
                             module_threshold=s.module_threshold, layer_threshold=s.layer_threshold,
                             source=self.delta_source)

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        delta, groups = self.delta(inputs), dict(ctx.plan.groups)
        if ctx.tensor not in groups:
            return delta
        densities: dppa.DPDensities = ctx.stats["layer_outliers"][0]
        if ctx.tensor == next(iter(groups)):
            log_summary(self.step.id, densities, groups)
        return dppa.dp_prune_tensor(delta, densities.module_density[ctx.tensor])

    def plan_notes(self, plan: StepPlan) -> list[str]:
        return self.group_notes(plan)

    def report(self, plan: StepPlan, stats: dict[str, Any]) -> dict[str, Any]:
        """Per-module outlier ratio, density and planned kept count (``dppa_report.json``)."""
        numels = {n: plan.metas[n].numel for n in plan.groups}
        return {"op": self.name, **density_report(stats["layer_outliers"][0], dict(plan.groups), numels)}
