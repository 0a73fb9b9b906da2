"""DARE (Yu et al. 2023): the ``dare`` op and the ``dare_linear`` / ``dare_ties`` merge methods.

Each entry of a delta is dropped with probability ``1 - density``; survivors are rescaled (by
``1/density`` per element as in the paper; ``l1`` matches mergekit). The random draws come from a
generator seeded with (recipe seed, step id, tensor name): reproducible, and independent of the
order tensors are processed in.

```yaml
- {id: r_math, op: dare, input: d_math, density: 0.1, rescale: per_element}
- {id: merged, op: merge, method: dare_ties, base: base, inputs: [d_math, d_code], density: 0.2}
```
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.rng import tensor_generator
from mergeengine.kernels.sparsify import dare
from mergeengine.kernels.ties import ties_merge
from mergeengine.ops import register, register_method
from mergeengine.ops.base import TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep, Scope
from mergeengine.ops.merge import Density, MergeOp, MergeStep, per_input
from mergeengine.ops.ties import NonNegativeWeights

Rescale = Literal["per_element", "l1", "none"]
RESCALE_HELP = "per_element: divide survivors by density (paper); l1: match the L1 norm (mergekit); none."


class DareStep(DeltaStep):
    """Random drop-and-rescale of one delta."""

    op: Literal["dare"]
    density: float = Field(gt=0, le=1, description="Keep probability (1 - drop rate).")
    rescale: Rescale = Field("per_element", description=RESCALE_HELP)
    scope: Scope = Field("all", description="all tensors, or decoder_linear (the tensors DP prunes).")


@register
class Dare(DeltaOp):
    """Per tensor: Bernoulli(density) mask from the tensor's own generator."""

    name = "dare"
    Step = DareStep
    step: DareStep

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if not self.in_scope(ctx.tensor, self.step.scope):
            return inputs[0]
        g = tensor_generator(ctx.seed, ctx.step, ctx.tensor)
        return dare(inputs[0], self.step.density, self.step.rescale, generator=g)


class DareMergeStep(MergeStep):
    """Shared fields of dare_linear and dare_ties."""

    density: Density | list[Density] = Field(description="Keep probability, one for all inputs or one per input.")
    rescale: Rescale = Field("per_element", description=RESCALE_HELP)


class DareMerge(MergeOp):
    """DARE on each input delta (generator per input, step and tensor), then a combination."""

    step: DareMergeStep

    def dropped(self, deltas: list[torch.Tensor], ctx: TaskContext) -> list[torch.Tensor]:
        densities = per_input(self.step.density, len(deltas))
        return [
            dare(d, p, self.step.rescale, generator=tensor_generator(ctx.seed, f"{ctx.step}/{i}", ctx.tensor))
            for i, (d, p) in enumerate(zip(deltas, densities, strict=True))
        ]


class DareLinearStep(DareMergeStep):
    """DARE, then task arithmetic."""

    method: Literal["dare_linear"]


@register_method
class DareLinear(DareMerge):
    """``base + lambda * sum_i w_i dare(delta_i)``."""

    method = "dare_linear"
    Step = DareLinearStep

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        out = torch.zeros_like(deltas[0])
        for w, d in zip(self.weights, self.dropped(deltas, ctx), strict=True):
            out.add_(d, alpha=w)
        return out


class DareTiesStep(DareMergeStep, NonNegativeWeights):
    """DARE, then TIES sign election and disjoint mean (no magnitude trim)."""

    method: Literal["dare_ties"]
    vote: Literal["unweighted", "weighted"] = Field("unweighted", description="Weights in the sign vote (mergekit: weighted).")


@register_method
class DareTies(DareMerge):
    """``base + lambda * ties_merge(dare(delta_i))``."""

    method = "dare_ties"
    Step = DareTiesStep
    step: DareTiesStep

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        return ties_merge(self.dropped(deltas, ctx), self.weights, vote=self.step.vote)
