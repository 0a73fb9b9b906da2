"""Exact order statistics of magnitudes, fast on large tensors."""

from __future__ import annotations

import torch


def kth_smallest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value of ``|x|`` (1-based), exactly.

    Args:
        x: any float tensor.
        k: rank, 1 <= k <= x.numel().

    Returns:
        A 0-d float32 tensor.
    """
    flat = x.detach().reshape(-1).abs().float()
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} out of range for {flat.numel()} elements")
    return torch.kthvalue(flat, k).values
