"""``dare`` (Yu et al. 2023): drop each entry of a delta with probability ``1 - density``.

Survivors are rescaled (by ``1/density`` per element as in the paper; ``l1`` matches mergekit).
The random draws come from a generator seeded with (recipe seed, step id, tensor name):
reproducible, and independent of the order tensors are processed in. The merge methods
``dare_linear`` and ``dare_ties`` are in :mod:`mergeengine.methods`.

```yaml
- {id: r_math, op: dare, input: d_math, density: 0.1, rescale: per_element}
```
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeengine.kernels.rng import tensor_generator
from mergeengine.kernels.sparsify import dare
from mergeengine.ops import register
from mergeengine.ops.base import TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep, Scope

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

    compute_bound = True
    name = "dare"
    Step = DareStep
    step: DareStep

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if not self.in_scope(ctx.tensor, self.step.scope):
            return inputs[0]
        g = tensor_generator(ctx.seed, ctx.step, ctx.tensor)
        return dare(inputs[0], self.step.density, self.step.rescale, generator=g)
