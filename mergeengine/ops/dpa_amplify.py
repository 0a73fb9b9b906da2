"""``dpa_amplify``: DPPA's Dynamic Partition Amplification (docs/recipes.md, "dpa_amplify").

Partition k holds the entries kept at density d_k but not at d_(k-1) (DP ranking by default, so
masks are nested); each partition is multiplied by its own factor; entries outside the last
density are 0; tensors DP leaves dense are multiplied by ``dense_scale``. ``prune_rule`` sets the
count each partition's density drops (``exact``, or the release's; :mod:`mergeengine.kernels.prune_rule`).

```yaml
- id: a_math
  op: dpa_amplify
  input: d_math
  partitions: [{density: 0.1, scale: 1.8}, {density: 0.2, scale: 1.0}]
  dense_scale: max
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mergeengine.kernels import dpa_scale as dppa
from mergeengine.kernels.dp_density import DPDensities
from mergeengine.kernels.dp_groups import apply_units
from mergeengine.kernels.prune_rule import PruneRule, pruned_count
from mergeengine.ops import register
from mergeengine.ops.base import ChunkFill, Reduction, StepPlan, TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep
from mergeengine.ops.dp_stats import (
    DPSettings,
    Lamda,
    LayerThreshold,
    ModuleThreshold,
    PruneRuleField,
    density_report,
    dp_reductions,
    dp_settings,
    explain_dp,
    log_summary,
)
from mergeengine.recipe.schedule import checks_entry_rules
from mergeengine.runtime import numpy_threads


class Partition(BaseModel):
    """One partition: the density at which its entries enter, and their factor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    density: float = Field(gt=0, le=1)
    scale: float = Field(ge=0)


class DpaAmplifyStep(DeltaStep):
    """DPA parameters; the DP ranking's parameters are those of dp_prune."""

    op: Literal["dpa_amplify"]
    select: Literal["dp", "magnitude"] = Field("dp", description="Ranking that defines the partitions.")
    lamda: float = Lamda
    module_threshold: float = ModuleThreshold
    layer_threshold: float = LayerThreshold
    prune_rule: PruneRule = PruneRuleField
    partitions: list[Partition] = Field(min_length=1, description="Ascending densities, each with its factor.")
    factors: Literal["own", "release"] = Field(
        "own",
        description="own: each partition gets its scale. release: the release's 'larger magnitude wins' "
        "pick (partition k gets max(s_k..s_n)).",
    )
    dense_scale: Literal["max"] | float = Field(
        "max", description="Factor for tensors DP leaves dense: max (release) or a number."
    )

    @field_validator("partitions")
    @classmethod
    def _ascending(cls, parts: list[Partition], info: ValidationInfo) -> list[Partition]:
        if not checks_entry_rules(info.context, info.data.get("id")):  # filtered schedules: checked per tensor
            return parts
        ds = [p.density for p in parts]
        if any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
            raise ValueError(f"partition densities must be strictly ascending, got {ds}")
        return parts


@register
class DpaAmplify(DeltaOp):
    """Statistics passes as dp_prune (for select: dp), then per-tensor partition scaling."""

    compute_bound = True
    name = "dpa_amplify"
    fuses_diff = True
    Step = DpaAmplifyStep
    step: DpaAmplifyStep

    @property
    def scales(self) -> list[float]:
        """Each partition's factor (``factors: release``: the release's pick)."""
        scales = [p.scale for p in self.step.partitions]
        return dppa.release_factors(scales)[0] if self.step.factors == "release" else scales

    @property
    def dense(self) -> float:
        """The factor of the tensors DP leaves dense."""
        return max(self.scales) if self.step.dense_scale == "max" else float(self.step.dense_scale)

    @property
    def targets(self) -> list[float]:
        """The partitions' densities."""
        return [p.density for p in self.step.partitions]

    def settings(self, plan: StepPlan) -> dict[str, DPSettings]:
        """Each DP module's parameters (scheduled fields at its tensor's values)."""
        return dp_settings(self, plan, self.tensor_units(plan), lambda step: tuple(p.density for p in step.partitions))

    def reductions(self, plan: StepPlan) -> list[Reduction]:
        if self.step.select != "dp":
            return []
        return dp_reductions(self.step.id, dict(plan.groups), self.settings(plan), source=self.delta_source,
                             units=self.tensor_units(plan))

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        units = self.tensor_units(ctx.plan)
        if ctx.tensor not in units:
            return self.delta(inputs) * self.dense
        delta = self.delta_source(inputs)  # a fused diff is computed chunk by chunk, never stored
        rule = self.step.prune_rule
        if self.step.select == "magnitude":
            return apply_units(delta, units[ctx.tensor], lambda sub, key:
                               dppa.dpa_amplify_magnitude_tensor(sub, self.targets, self.scales, rule))
        self._log_first(ctx.plan, ctx.tensor, ctx.stats)
        return apply_units(delta, units[ctx.tensor], lambda sub, key: dppa.dpa_amplify_tensor(
            sub, self._densities(key, ctx.stats), self.scales, rule=rule))

    def _log_first(self, plan: StepPlan, tensor: str, stats: Mapping[str, Any]) -> None:
        """Log the step's density summary once, at its first prunable tensor."""
        if tensor == next(iter(self.tensor_units(plan))):
            log_summary(self.step.id, stats["layer_outliers"][-1], dict(plan.groups))

    def _densities(self, key: str, stats: Mapping[str, Any]) -> list[float]:
        """DP's partition densities of module ``key``."""
        per_target: list[DPDensities] = stats["layer_outliers"]
        return [d.module_density[key] for d in per_target]

    def fusable_into_merge(self, plan: StepPlan) -> bool:
        """Whether a merge may amplify this step's chunks itself (:meth:`chunk_amplifier`): DP
        selection on a fused diff, and no fused expert tensor (each expert has its own thresholds)."""
        return self.step.select == "dp" and bool(plan.read_from) and not self.dp_groups(plan).fused

    def chunk_amplifier(self, plan: StepPlan, model: torch.Tensor, base: torch.Tensor, tensor: str,
                        stats: Mapping[str, Any]) -> ChunkFill:
        """This step's output for ``tensor``, chunk by chunk, for a merge that reads ``model`` and
        ``base`` itself (see :meth:`Op.fuse_deltas`).

        Selects the partition thresholds now (one read of the pair); the returned
        ``fill(delta, out)`` writes the amplified float32 values of a chunk of ``model - base``
        into ``out``. The floats are those of :meth:`compute`, and no amplified delta is ever
        stored.
        """
        op = self.for_tensor(plan, tensor)  # this tensor's factors (they may be scheduled)
        if tensor not in self.tensor_units(plan):
            return lambda delta, out: torch.mul(delta, op.dense, out=out)
        self._log_first(plan, tensor, stats)
        with numpy_threads():  # the threshold selection is numpy: torch's second thread would only spin
            return dppa.PartitionScaler((model, base), self._densities(tensor, stats), op.scales,
                                        rule=self.step.prune_rule).scale

    def plan_notes(self, plan: StepPlan) -> list[str]:
        return self.group_notes(plan)

    def explain(self, plan: StepPlan, tensor: str) -> list[str]:
        """The partitions' DP densities with this tensor's values, and its factors."""
        op = self.for_tensor(plan, tensor)
        units = self.tensor_units(plan)
        if tensor not in units:
            return [f"dense: not a decoder linear weight, multiplied by dense_scale {op.dense:.6g}"]
        factors = [f"factors {', '.join(f'{f:.6g}' for f in op.scales)}"]
        if self.step.select != "dp":
            return factors + [f"partition densities {', '.join(f'{d:.6g}' for d in op.targets)} of the tensor's "
                              "magnitude ranking"]
        names = [f"partitions.{k}.density" for k in range(len(op.targets))]
        return factors + explain_dp(self.settings(plan), units[tensor], names)

    def report(self, plan: StepPlan, stats: dict[str, Any]) -> dict[str, Any]:
        """Per-partition DP densities and kept counts (``dppa_report.json``); the factors per tensor
        where a schedule makes them vary."""
        rule = self.step.prune_rule
        factors = {n: self.for_tensor(plan, n).scales for n in plan.metas}
        dense = {n: self.for_tensor(plan, n).dense for n in plan.metas}
        out: dict[str, Any] = {"op": self.name, "select": self.step.select,
                               "factors": _one_or_all(factors, self.scales),
                               "dense_scale": _one_or_all(dense, self.dense), "prune_rule": rule}
        if self.step.select == "dp":
            numels, settings = self.unit_numels(plan), self.settings(plan)
            out["partitions"] = [density_report(d, dict(plan.groups), numels, rule,
                                                {key: (s.targets[k], s.lamda) for key, s in settings.items()})
                                 for k, d in enumerate(stats["layer_outliers"])]
        else:
            targets = {key: self.for_tensor(plan, n).targets for n, keys in self.tensor_units(plan).items() for key in keys}
            out["kept"] = {n: [numel - pruned_count(numel, d, rule) for d in targets[n]]
                           for n, numel in self.unit_numels(plan).items()}
        return out


def _one_or_all(per_tensor: dict[str, Any], value: Any) -> Any:
    """``value`` when every tensor has it, else the per-tensor values."""
    return value if all(v == value for v in per_tensor.values()) else per_tensor
