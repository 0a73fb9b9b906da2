"""Shared base of the ops that transform one delta into another (pruning, amplification)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.dp_groups import DPGroups, dp_module_groups, grouping_notes
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TensorMeta
from mergeengine.ops.diff import chunked_diff

Scope = Literal["all", "decoder_linear"]


class DeltaStep(StepModel):
    """A step reading one delta."""

    input: str = Field(description="Step id of a delta (diff, or another delta op).")


class DeltaOp(Op):
    """Input: one delta; output: a delta with the same tensors, relative to the same base."""

    step: DeltaStep

    def references(self) -> dict[str, list[str]]:
        return {"input": [self.step.input]}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        src = kinds.get(self.step.input)
        if src is None:
            return None, []
        if src.kind != "delta":
            return None, [("input", f"'{self.step.input}' is a model; {self.name} takes a delta (add a diff step)")]
        return src, []

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """Float32 tensors named as the input's; ``groups``: DP's modules (key -> (layer, module)),
        ``details["dp_groups"]``: the modules and the tensors they live in (kernels/dp_groups.py)."""
        metas = inputs.metas[self.step.input]
        dp_groups = dp_module_groups({n: m.shape for n, m in metas.items()})
        return StepPlan({n: TensorMeta(m.shape, torch.float32) for n, m in metas.items()}, inputs.kinds[self.step.id],
                        input_kinds={self.step.input: "delta"}, groups=dp_groups.units,
                        details={"dp_groups": dp_groups})

    @staticmethod
    def dp_groups(plan: StepPlan) -> DPGroups:
        """DP's modules and the tensors they live in, as planned for this step."""
        return plan.details["dp_groups"]

    @staticmethod
    def tensor_units(plan: StepPlan) -> dict[str, list[str]]:
        """Prunable tensor -> its DP module keys (one per expert of a fused expert tensor)."""
        return plan.details["dp_groups"].slices

    #: Whether this op may read a plain diff's model and base itself (see :meth:`fuse_diffs`).
    fuses_diff: bool = False

    def fuse_diffs(self, plan: StepPlan, ops: Mapping[str, Op]) -> StepPlan:
        """Read the fine-tuned model and its base directly when the input is a plain ``diff``.

        The statistics passes then compute ``|model - base|`` chunk by chunk in cache instead of
        materialising a float32 delta in every pass (the same floats).
        """
        op = ops.get(self.step.input)
        if self.fuses_diff and op is not None and op.name == "diff" and op.step.vocab == "error":
            return replace(plan, read_from={self.step.input: (op.step.model, op.step.base)})
        return plan

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        return [(s, name) for s in plan.read_from.get(self.step.input, (self.step.input,))]

    @staticmethod
    def delta_source(inputs: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What statistics read: the delta, or ``(model, base)`` when the diff is fused."""
        return (inputs[0], inputs[1]) if len(inputs) == 2 else inputs[0]

    @staticmethod
    def delta(inputs: list[torch.Tensor]) -> torch.Tensor:
        """The input delta (computed here, as the diff step would, when the diff is fused)."""
        return chunked_diff(inputs[0], inputs[1]) if len(inputs) == 2 else inputs[0]

    @staticmethod
    def in_scope(plan: StepPlan, name: str, scope: Scope) -> bool:
        """Whether ``name`` is transformed under ``scope`` (else it passes through)."""
        return scope == "all" or name in DeltaOp.tensor_units(plan)

    @staticmethod
    def unit_numels(plan: StepPlan) -> dict[str, int]:
        """Element count of each DP module (an expert slice holds its tensor's numel / E)."""
        return {key: plan.metas[name].numel // len(keys)
                for name, keys in DeltaOp.tensor_units(plan).items() for key in keys}

    @staticmethod
    def group_notes(plan: StepPlan) -> list[str]:
        """What the decoder-linear grouping found (shown by ``plan``)."""
        return grouping_notes(DeltaOp.dp_groups(plan), len(plan.metas))
