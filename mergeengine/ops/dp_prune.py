"""``dp_prune``: DPPA's Dynamic Pruning (docs/recipes.md, "dp_prune").

Magnitude pruning of a delta with a keep fraction that varies per decoder layer and per linear
module according to their outlier ratios. Embeddings, norms and lm_head pass through dense.

```yaml
- {id: p_math, op: dp_prune, input: d_math, density: 0.2, lamda: 0.08, module_threshold: 5, layer_threshold: 3}
```

``prune_rule: release`` prunes as the DPPA release does (see :mod:`mergeengine.kernels.prune_rule`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergeengine.kernels import dp_density as dppa
from mergeengine.kernels.dp_groups import apply_units
from mergeengine.kernels.prune_rule import PruneRule
from mergeengine.ops import register
from mergeengine.ops.base import Reduction, StepPlan, TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep
from mergeengine.ops.dp_stats import (
    Lamda,
    LayerThreshold,
    ModuleThreshold,
    PruneRuleField,
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
    prune_rule: PruneRule = PruneRuleField


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
                             source=self.delta_source, units=self.tensor_units(plan))

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        delta, units = self.delta(inputs), self.tensor_units(ctx.plan)
        if ctx.tensor not in units:
            return delta
        densities: dppa.DPDensities = ctx.stats["layer_outliers"][0]
        if ctx.tensor == next(iter(units)):
            log_summary(self.step.id, densities, dict(ctx.plan.groups))
        return apply_units(delta, units[ctx.tensor], lambda sub, key: dppa.dp_prune_tensor(
            sub, densities.module_density[key], self.step.prune_rule))

    def plan_notes(self, plan: StepPlan) -> list[str]:
        return self.group_notes(plan)

    def report(self, plan: StepPlan, stats: dict[str, Any]) -> dict[str, Any]:
        """Per-module outlier ratio, density and planned kept count (``dppa_report.json``)."""
        numels = self.unit_numels(plan)
        return {"op": self.name, "prune_rule": self.step.prune_rule,
                **density_report(stats["layer_outliers"][0], dict(plan.groups), numels, self.step.prune_rule)}
