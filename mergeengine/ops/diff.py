"""``diff``: the task vector of a fine-tuned model, ``delta = model - base`` in float32.

```yaml
- {id: d_math, op: diff, model: math, base: base}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from mergeengine.errors import ShapeError
from mergeengine.kernels.chunking import spans
from mergeengine.ops import register
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TaskContext, same_tensors
from mergeengine.ops.chunks import merge_chunk
from mergeengine.ops.vocab import VocabPolicy, align_vocab, aligned_meta, vocab_shapes


class DiffStep(StepModel):
    """Subtract a base model from a fine-tuned one."""

    op: Literal["diff"]
    model: str = Field(description="Step id of the fine-tuned model.")
    base: str = Field(description="Step id of the base model.")
    vocab: VocabPolicy = Field(
        "error",
        description="When the fine-tune has more embedding/lm_head rows than the base: "
        "error, truncate (drop the extra rows, as the DPPA release does) or pad_base.",
    )


@register
class DiffOp(Op):
    """Per tensor: ``model.float() - base.float()``."""

    name = "diff"
    Step = DiffStep
    step: DiffStep

    def references(self) -> dict[str, list[str]]:
        return {"model": [self.step.model], "base": [self.step.base]}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        problems = []
        for field in ("model", "base"):
            ref = getattr(self.step, field)
            if ref in kinds and kinds[ref].kind != "model":
                problems.append((field, f"'{ref}' is a {kinds[ref].kind}; diff takes two models"))
        if problems or self.step.model not in kinds:
            return None, problems
        return StepKind("delta", origin=kinds[self.step.model].origin, base=self.step.base), []

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """Names and shapes must agree; vocabulary rows per ``vocab`` (``details["row_mismatch"]``)."""
        model, base = dict(inputs.metas[self.step.model]), dict(inputs.metas[self.step.base])
        mismatch = vocab_shapes(self.step.id, self.step.vocab, model, base, self.step.model, self.step.base)
        if mismatch:
            # Both sides take the aligned shape, so the usual name/shape check covers the rest.
            fixed = {n: aligned_meta(self.step.vocab, model[n], base[n]) for n in mismatch}
            model = {**model, **fixed}
            base = {**base, **fixed}
        try:
            metas = same_tensors(self.step.id, [(self.step.base, base), (self.step.model, model)])
        except ShapeError as exc:
            raise ShapeError(exc.message, step=self.step.id) from None
        return StepPlan(metas, inputs.kinds[self.step.id], details={"row_mismatch": mismatch})

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        return [(self.step.model, name), (self.step.base, name)]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        model, base = inputs
        if ctx.tensor in ctx.plan.details["row_mismatch"]:
            model, base = align_vocab(self.step.vocab, model, base)
        return chunked_diff(model, base)


def chunked_diff(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``model.float() - base`` as a new float32 tensor, computed chunk by chunk.

    The base is converted in cache-sized scratch: float32 minus bfloat16 in place runs ~5x
    slower than float32 minus float32. Same floats as the whole-tensor expression.
    """
    if model.dtype == torch.float32 or model.dtype != base.dtype:
        out = model.float()
        return out.sub_(base) if out is not model else out - base
    flat_m, flat_b = model.reshape(-1), base.reshape(-1)
    numel = flat_m.numel()
    out = torch.empty(numel, dtype=torch.float32, device=model.device)
    scratch = torch.empty(min(numel, merge_chunk()), dtype=torch.float32, device=model.device)
    for start, end in spans(numel, merge_chunk()):
        b = scratch[: end - start]
        b.copy_(flat_b[start:end])
        out[start:end].copy_(flat_m[start:end]).sub_(b)
    return out.view(model.shape)
