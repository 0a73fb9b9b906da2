"""Shared base of the ops that transform one delta into another (pruning, amplification)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.dppa import decoder_linear_groups
from mergeengine.ops.base import Op, StepKind, StepModel, TensorMeta

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

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        metas = inputs[self.step.input]
        self.groups = decoder_linear_groups({n: m.shape for n, m in metas.items()})
        return {n: TensorMeta(m.shape, torch.float32) for n, m in metas.items()}

    def sources(self, name: str) -> list[tuple[str, str]]:
        return [(self.step.input, name)]

    def in_scope(self, name: str, scope: Scope) -> bool:
        """Whether ``name`` is transformed under ``scope`` (else it passes through)."""
        return scope == "all" or name in self.groups

    def group_notes(self) -> list[str]:
        """One line on what the decoder-linear grouping found (shown by ``plan``)."""
        layers = sorted({layer for layer, _ in self.groups.values()})
        modules = sorted({module for _, module in self.groups.values()})
        dense = len(self.metas) - len(self.groups) if self.metas else 0
        if not self.groups:
            return ["no decoder linear weights found: every tensor passes through dense"]
        return [
            f"decoder linear weights: {len(self.groups)} tensors in {len(layers)} layers "
            f"(modules: {', '.join(modules)}); {dense} other tensors dense"
        ]
