"""Shared base of the ops that transform one delta into another (pruning, amplification)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.dp_groups import dp_module_groups, grouping_notes
from mergeengine.ops.base import Op, StepKind, StepModel, TensorMeta
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

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        metas = inputs[self.step.input]
        self.dp_groups = dp_module_groups({n: m.shape for n, m in metas.items()})
        self.groups = self.dp_groups.units  # DP's modules: key -> (layer, module)
        self.tensor_units = self.dp_groups.slices  # prunable tensor -> its module keys
        return {n: TensorMeta(m.shape, torch.float32) for n, m in metas.items()}

    #: Whether this op may read a plain diff's model and base itself (see :meth:`fuse_diffs`).
    fuses_diff: bool = False
    read_from: tuple[str, str] | None = None

    def fuse_diffs(self, ops: Mapping[str, Op]) -> list[str]:
        """Read the fine-tuned model and its base directly when the input is a plain ``diff``.

        The statistics passes then compute ``|model - base|`` chunk by chunk in cache instead of
        materialising a float32 delta in every pass (the same floats). Returns the fused ids.
        """
        self.read_from = None
        op = ops.get(self.step.input)
        if self.fuses_diff and op is not None and op.name == "diff" and op.step.vocab == "error":
            self.read_from = (op.step.model, op.step.base)
            return [self.step.input]
        return []

    def sources(self, name: str) -> list[tuple[str, str]]:
        if self.read_from is not None:
            return [(self.read_from[0], name), (self.read_from[1], name)]
        return [(self.step.input, name)]

    def delta_source(self, inputs: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What statistics read: the delta, or ``(model, base)`` when the diff is fused."""
        return (inputs[0], inputs[1]) if self.read_from is not None else inputs[0]

    def delta(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The input delta (computed here, as the diff step would, when the diff is fused)."""
        return chunked_diff(inputs[0], inputs[1]) if self.read_from is not None else inputs[0]

    def in_scope(self, name: str, scope: Scope) -> bool:
        """Whether ``name`` is transformed under ``scope`` (else it passes through)."""
        return scope == "all" or name in self.tensor_units

    def unit_numels(self) -> dict[str, int]:
        """Element count of each DP module (an expert slice holds its tensor's numel / E)."""
        return {key: self.metas[name].numel // len(keys)
                for name, keys in self.tensor_units.items() for key in keys}

    def group_notes(self) -> list[str]:
        """What the decoder-linear grouping found (shown by ``plan``)."""
        return grouping_notes(self.dp_groups, len(self.metas) if self.metas else 0)
