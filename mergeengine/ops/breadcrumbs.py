"""Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest ``gamma`` and the smallest
magnitudes, keep the ``density`` fraction in between, then task arithmetic.

```yaml
- {id: merged, op: merge, method: breadcrumbs, base: base, inputs: [d_math, d_code], density: 0.2, gamma: 0.01}
```
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from mergeengine.kernels.sparsify import breadcrumbs
from mergeengine.ops import register_method
from mergeengine.ops.base import TaskContext
from mergeengine.ops.merge import (
    KEEP_COUNT_DEFAULT,
    KEEP_COUNT_HELP,
    Density,
    KeepCount,
    MergeOp,
    MergeStep,
    per_input,
)

Gamma = Annotated[float, Field(ge=0, le=1)]


class BreadcrumbsStep(MergeStep):
    """Breadcrumbs parameters (gamma 0 keeps exactly the top-density entries)."""

    method: Literal["breadcrumbs"]
    density: Density | list[Density] = Field(description="Fraction kept after dropping the top gamma.")
    gamma: Gamma | list[Gamma] = Field(0.01, description="Fraction of largest magnitudes dropped.")
    keep_count: KeepCount = Field(KEEP_COUNT_DEFAULT, description=KEEP_COUNT_HELP)


@register_method
class Breadcrumbs(MergeOp):
    """Per tensor: breadcrumbs mask on each delta, then ``sum_i w_i delta_i``."""

    compute_bound = True
    method = "breadcrumbs"
    Step = BreadcrumbsStep
    step: BreadcrumbsStep

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        n = len(deltas)
        out = torch.zeros_like(deltas[0])
        for w, d, p, g in zip(self.weights, deltas, per_input(self.step.density, n), per_input(self.step.gamma, n),
                              strict=True):
            out.add_(breadcrumbs(d, p, g, self.step.keep_count), alpha=w)
        return out
