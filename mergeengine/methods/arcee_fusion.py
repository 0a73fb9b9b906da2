"""Arcee Fusion (mergekit's arcee_fusion): keep only the model's most important changes to the base.

Per tensor, with ``p = softmax(model) + 1e-8`` and ``q = softmax(base) + 1e-8`` along the last
dimension (a 1-D tensor is one row)::

    importance = |model − base| · KL(p ‖ q)        (KL per row, broadcast along it)
    threshold  = median + 1.5 (q3 − q1)            (quantiles of importance over the tensor)
    fusion     = base + (model − base) · [importance >= threshold]

Quantile ``q`` is the ``floor(q (n − 1))``-th smallest importance (mergekit's index rule), taken
exactly over all ``n`` entries; mergekit estimates it from a random sample of one million entries
when a tensor is larger, which makes its output change from run to run.

```yaml
- {id: m, op: merge, method: arcee_fusion, base: base, inputs: [chat]}
```
"""

import math

import torch

from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs

SOFTMAX_EPS = 1e-8


def importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``|model − base|`` times the per-row KL divergence of their softmaxes."""
    rows_b = base.reshape(-1, base.shape[-1]) if base.dim() > 1 else base.reshape(1, -1)
    rows_m = model.reshape(rows_b.shape)
    p = torch.softmax(rows_m, dim=-1).add_(SOFTMAX_EPS)
    q = torch.softmax(rows_b, dim=-1).add_(SOFTMAX_EPS)
    kl = (p * torch.log(q.reciprocal_().mul_(p))).sum(dim=-1, keepdim=True)
    del p, q
    return torch.sub(rows_m, rows_b).abs_().mul_(kl).view(base.shape)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``floor(q (n − 1))``-th smallest entry (0-based) of ``values``."""
    flat = values.reshape(-1)
    return float(torch.kthvalue(flat, math.floor(q * (flat.numel() - 1)) + 1).values)


@merge_method(name="arcee_fusion", inputs="models")
def arcee_fusion(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """The base plus the model's changes whose importance reaches the dynamic threshold.

    Args:
        base: the base's tensor.
        models: exactly one model's tensor.

    Returns:
        The fused tensor.
    """
    expect_inputs("arcee_fusion", models, 1)
    scores = importance(base, models[0])
    threshold = quantile(scores, 0.5) + 1.5 * (quantile(scores, 0.75) - quantile(scores, 0.25))
    keep = scores >= threshold
    del scores
    delta = torch.sub(models[0], base)
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype)).add_(base)
