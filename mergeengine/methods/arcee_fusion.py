"""Arcee Fusion (mergekit's arcee_fusion): keep only the model's most important changes to the base.

Per tensor, with ``p = softmax(model) + 1e-8`` and ``q = softmax(base) + 1e-8`` along the last
dimension (a 1-D tensor is one row)::

    importance = |model − base| · KL(p ‖ q)        (KL per row, broadcast along it)
    threshold  = median + 1.5 (q3 − q1)            (quantiles of importance over the tensor)
    fusion     = base + (model − base) · [importance >= threshold]

Quantile ``q`` is the ``floor(q (n − 1))``-th smallest importance (mergekit's index rule), taken
exactly over all ``n`` entries; mergekit estimates it from a random sample of one million entries
when a tensor is larger, which makes its output change from run to run. The KL divergence is
computed in float64 (``kl_dtype: float64``, the default) or in float32 as mergekit does
(``kl_dtype: float32``), which moves a few entries of two close models across the threshold.

```yaml
- {id: m, op: merge, method: arcee_fusion, base: base, inputs: [chat]}
```
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mergeengine.kernels.chunking import spans
from mergeengine.methods import merge_method
from mergeengine.methods._checks import expect_inputs, labelled, require_finite
from mergeengine.methods._reduce import CHUNK

SOFTMAX_EPS = 1e-8

KlDtype = Literal["float64", "float32"]


def row_kl(rows_m: torch.Tensor, rows_b: torch.Tensor, kl_dtype: KlDtype = "float64") -> torch.Tensor:
    """``KL(softmax(m) + eps ‖ softmax(b) + eps)`` per row, in ``kl_dtype`` a few rows at a time:
    the divergence of two close models is a small difference of large terms, which float32 loses."""
    dtype = torch.float64 if kl_dtype == "float64" else torch.float32
    out = torch.empty(rows_b.shape[0], 1, dtype=torch.float32, device=rows_b.device)
    step = max(1, CHUNK // max(rows_b.shape[1], 1))
    for start, end in spans(rows_b.shape[0], step):  # spans of rows
        p = torch.softmax(rows_m[start:end].to(dtype), dim=-1).add_(SOFTMAX_EPS)
        q = torch.softmax(rows_b[start:end].to(dtype), dim=-1).add_(SOFTMAX_EPS)
        out[start:end] = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return out


def importance(base: torch.Tensor, model: torch.Tensor, kl_dtype: KlDtype = "float64") -> torch.Tensor:
    """``|model − base|`` times the per-row KL divergence of their softmaxes."""
    rows_b = base.reshape(-1, base.shape[-1]) if base.dim() > 1 else base.reshape(1, -1)
    rows_m = model.reshape(rows_b.shape)
    return torch.sub(rows_m, rows_b).abs_().mul_(row_kl(rows_m, rows_b, kl_dtype)).view(base.shape)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``floor(q (n − 1))``-th smallest entry (0-based) of ``values``."""
    flat = values.reshape(-1)
    return float(torch.kthvalue(flat, math.floor(q * (flat.numel() - 1)) + 1).values)


@merge_method(name="arcee_fusion", inputs="models", compute_bound=True)
def arcee_fusion(base: torch.Tensor, models: list[torch.Tensor], *, kl_dtype: KlDtype = "float64") -> torch.Tensor:
    """The base plus the model's changes whose importance reaches the dynamic threshold.

    Args:
        base: the base's tensor.
        models: exactly one model's tensor.
        kl_dtype: float64: the KL divergence per row in float64 (default); float32: in float32 (mergekit).

    Returns:
        The fused tensor.
    """
    expect_inputs("arcee_fusion", models, 1)
    require_finite("arcee_fusion", labelled(models, base, "model"))
    scores = importance(base, models[0], kl_dtype)
    threshold = quantile(scores, 0.5) + 1.5 * (quantile(scores, 0.75) - quantile(scores, 0.25))
    keep = scores >= threshold
    del scores
    delta = torch.sub(models[0], base)
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype)).add_(base)
