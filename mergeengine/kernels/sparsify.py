"""Sparsification of a delta tensor: magnitude pruning, DARE, model-breadcrumbs, threshold pruning.

Each function takes one delta (task vector) tensor and returns a new float32 tensor of the same
shape; the input is never modified. Counts come from :func:`~mergeengine.kernels.select_exact.keep_count`
(``k = floor(density * numel + 0.5)``) and rankings from
:func:`~mergeengine.kernels.select_exact.topk_abs_mask` (magnitude descending, ties broken by flat
index ascending, exactly ``k`` kept). Any shape works, including 0-d, one-element and empty tensors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mergeengine.kernels.chunking import block_sums, exact_total
from mergeengine.kernels.select_exact import check_fraction, keep_count, topk_abs_mask

RescaleMode = Literal["per_element", "l1", "none"]
RESCALE_MODES: tuple[str, ...] = ("per_element", "l1", "none")


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest.

    Exactly ``k = floor(density * numel + 0.5)`` entries are kept (ties at the threshold go to the
    lowest flat indices, see :func:`~mergeengine.kernels.select_exact.topk_abs_mask`). No rescaling.
    This is also TIES's trim step and the ``magnitude`` baseline of the DPPA paper.

    Args:
        delta: delta tensor (converted to float32).
        density: keep fraction in [0, 1]; 0 zeroes everything, 1 keeps everything.

    Returns:
        A new float32 tensor of ``delta``'s shape.

    Raises:
        ValueError: when ``density`` is not in [0, 1].

    Example:
        >>> magnitude_prune(torch.tensor([0.1, -0.4, 0.3, 0.2]), 0.5)
        tensor([ 0.0000, -0.4000,  0.3000,  0.0000])
    """
    values = delta.detach().to(torch.float32)
    k = keep_count(values.numel(), density)
    return _keep(values, topk_abs_mask(values, k))


def dare(
    delta: torch.Tensor,
    density: float,
    rescale: RescaleMode = "per_element",
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each entry with probability ``1 - density``, rescale survivors.

    Entry ``i`` survives when ``u_i < density`` with ``u = torch.rand(delta.shape, generator)``:
    independent Bernoulli draws with keep probability ``density``. Because ``u`` does not depend on
    ``density``, the same generator state gives nested survivor sets for increasing densities.

    Rescaling of the survivors:

    * ``"per_element"`` (the paper, default): divide by ``density`` (= multiply by ``1/(1-p)``), so
      every entry is unbiased: ``E[result] = delta``. ``density == 0`` gives all zeros.
    * ``"l1"`` (mergekit's way): multiply by ``||delta||_1 / ||survivors||_1`` so the L1 norm of
      the result equals the original's. When nothing non-zero survives the result is all zeros.
    * ``"none"``: survivors unchanged.

    Args:
        delta: delta tensor (converted to float32).
        density: keep probability in [0, 1] (``p = 1 - density`` is the drop rate).
        rescale: ``"per_element"``, ``"l1"`` or ``"none"``.
        generator: source of randomness (on any device; the draws follow it); use
            :func:`mergeengine.kernels.rng.tensor_generator` for per-tensor reproducibility.

    Returns:
        A new float32 tensor of ``delta``'s shape.

    Raises:
        ValueError: on a bad ``density`` or ``rescale``.

    Example:
        >>> from mergeengine.kernels.rng import tensor_generator
        >>> g = tensor_generator(0, "dare", "w")
        >>> dare(torch.ones(4), 0.5, generator=g).unique().tolist() in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    check_fraction(density, "density")
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {', '.join(RESCALE_MODES)}; got {rescale!r}")
    values = delta.detach().to(torch.float32)
    survive = dare_mask(values.shape, density, generator, values.device)
    kept = _keep(values, survive)
    if rescale == "per_element":
        if density == 0.0:
            return kept  # nothing survives; avoids 0/0
        return kept.div_(density)
    if rescale == "l1":
        norm_before = exact_total([block_sums(values.abs())])
        norm_after = exact_total([block_sums(kept.abs())])
        if norm_after == 0.0 or not math.isfinite(norm_before / norm_after):
            return kept
        return kept.mul_(norm_before / norm_after)
    return kept


def dare_mask(
    shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """DARE's survivors: ``rand(shape) < density``, drawn on the generator's device, then moved.

    Drawing on the generator's device makes the mask the same whatever device the math runs on.
    """
    return torch.rand(shape, generator=generator, device=generator.device).to(device) < density


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float, rounding: str = "round") -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers), keep the next ``density``.

    With entries ranked by magnitude (descending, ties by flat index ascending), the top
    ``n_top = floor(gamma * numel + 0.5)`` are zeroed, the next
    ``n_keep = floor(density * numel + 0.5)`` are kept unchanged, and the rest (the small
    magnitudes) are zeroed. When ``gamma + density`` exceeds 1 the kept band is clipped at the
    bottom: everything below the top ``n_top`` is kept. No rescaling.

    ``gamma == 0`` is exactly :func:`magnitude_prune`. ``rounding="truncate"`` counts both
    fractions as mergekit does, ``int(fraction * numel)`` (see :func:`keep_count`).

    Args:
        delta: delta tensor (converted to float32).
        density: fraction of entries kept, in [0, 1].
        gamma: fraction of largest-magnitude entries dropped, in [0, 1].
        rounding: ``round`` or ``truncate`` (mergekit's counts).

    Returns:
        A new float32 tensor of ``delta``'s shape.

    Raises:
        ValueError: when ``density`` or ``gamma`` is not in [0, 1].

    Example:
        >>> breadcrumbs(torch.tensor([4.0, -3.0, 2.0, 1.0]), density=0.5, gamma=0.25)
        tensor([ 0., -3.,  2.,  0.])
    """
    check_fraction(gamma, "gamma")
    values = delta.detach().to(torch.float32)
    numel = values.numel()
    n_top = keep_count(numel, gamma, rounding)
    n_end = min(numel, n_top + keep_count(numel, density, rounding))
    mask = topk_abs_mask(values, n_end)
    if n_top > 0:
        mask &= ~topk_abs_mask(values, n_top)  # nested masks: this removes exactly n_top entries
    return _keep(values, mask)


def threshold_prune(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries with ``|delta| >= threshold``, zero the rest.

    The per-tensor half of a model-wide trim: ``threshold`` comes from
    :class:`mergeengine.kernels.quantile.MagnitudeQuantile`. Every entry whose magnitude ties with
    the threshold is kept, so a model-wide trim can keep slightly more than its target count.
    ``threshold == +inf`` (what the quantile returns for a keep count of 0) keeps nothing.

    Args:
        delta: delta tensor (converted to float32).
        threshold: magnitude threshold, >= 0 or +inf.

    Returns:
        A new float32 tensor of ``delta``'s shape.

    Raises:
        ValueError: when ``threshold`` is negative or NaN.
    """
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    values = delta.detach().to(torch.float32)
    if math.isinf(threshold):
        return torch.zeros_like(values)
    return _keep(values, values.abs() >= threshold)


def _keep(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A new tensor holding ``values`` where ``mask`` and 0 elsewhere (no ``inf * 0`` NaNs)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
