"""DPPA kernels, Dynamic Pruning (DP): whole-model statistics, per-module densities, prune masks.

Pure tensor math for arXiv 2403.02799, as specified in docs/recipes.md (the paper's formulas, restated) (steps 1-6 below refer
to that file). Nothing here reads files or recipes. DP needs statistics over the whole model
before any module is pruned, so the engine streams over the deltas in three passes and never
holds more than one delta at a time; between passes only scalars are kept::

    groups = decoder_linear_groups({name: shape for name, shape in ...})   # what DP prunes
    # pass 1, per tensor in groups: sum |D| and numel
    sums = {name: magnitude_sum(delta(name)) for name in groups}
    means = layer_means({n: ModulePartial(s, k, 0) for n, (s, k) in sums.items()}, groups)
    # pass 2, per tensor, one read: module outliers (M = 5) and layer outliers (L = 3 in the release)
    counts = {n: count_above(delta(n), [5.0 * s / k, 3.0 * means[groups[n][0]]]) for n, (s, k) in sums.items()}
    partials = {n: ModulePartial(*sums[n], outlier_count=counts[n][0]) for n in groups}
    layers = layer_outlier_counts({n: c[1] for n, c in counts.items()}, groups)
    dens = dp_densities(partials, layers, groups, density=0.2, lamda=0.08)
    # pass 3, per tensor: prune (DP) or partition and rescale (DPA)
    pruned = dp_prune_tensor(delta(name), dens.module_density[name])

(:mod:`mergeengine.ops.dp_stats` runs passes 1 and 2 over the model, :mod:`mergeengine.ops.dp_prune`
and :mod:`mergeengine.ops.dpa_amplify` pass 3.)

For DPA with partitions ``[(d_1, s_1), (d_2, s_2), ...]`` the engine calls :func:`dp_densities`
once per ``d_k`` (cheap: scalars only) and passes this module's densities to
:func:`~mergeengine.kernels.dpa_scale.dpa_amplify_tensor`. The layer and module offsets do not
depend on ``d``, and clamping is monotone, so a module's densities are non-decreasing in ``d_k`` and the masks are nested.

Where docs/recipes.md needs a guard it does not state (each is tested):

* Steps 1-4 are computed exactly, in rational arithmetic from the integer outlier counts and
  element counts, and only converted to float at the end. "All ``c`` are 0" and "all ``r`` are
  equal" are then exact tests: in floating point, equal ratios leave ~1e-16 residues that the
  division by ``max |c|`` or ``max |r|`` would blow up to ``+-lamda``. It also makes the result
  independent of the order in which tensors were streamed.
* Step 2: ``max_l |c_l| = 0`` (one layer, or all layers with the same ratio): layer offsets 0
  (stated in docs/recipes.md).
* Step 4: ``mean(r) = 0`` (no module has an outlier): module offsets 0. After centring,
  ``max |r| = 0`` (all modules have the same ratio): module offsets 0.
* A tensor (or layer) with no elements has outlier ratio 0.
* Step 5: ``d_lj`` is clamped to [0, 1] and a :class:`DensityClampedWarning` (a ``UserWarning``,
  via :mod:`warnings`, so callers and tests can filter or escalate it) names the clamped
  modules; they are also listed in :attr:`DPDensities.clamped` for the engine to report.
* Step 6: ``k = floor(numel * (1 - d))`` is computed with a 1e-6 tolerance below integers, so that
  ``d = 0.9`` on 10 elements drops 1 element, not 0 (``10 * (1 - 0.9) = 0.9999999999999998``).
* Outlier thresholds (``M * mean``, ``L * layer_mean``) are float64; counts compare the float32
  magnitudes against them exactly, not against the threshold rounded to float32.
* Ties: an entry is kept iff its magnitude is strictly above the k-th smallest magnitude, so with
  ties at the threshold fewer than ``d * numel`` entries are kept. The same rule at every density
  keeps masks nested even with ties (a lower density has a larger k, hence a threshold that is
  not smaller).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from mergeengine.kernels.chunking import (
    DP_SUM_BLOCK,
    Delta,
    abs_chunks,
    block_sums,
    delta_numel,
    value_chunks,
)
from mergeengine.kernels.dp_groups import dp_module_groups
from mergeengine.kernels.prune_rule import PruneRule, pruned_count
from mergeengine.kernels.select_exact import kth_smallest_abs

__all__ = [
    "DEFAULT_LAMDA",
    "DEFAULT_LAYER_THRESHOLD",
    "DEFAULT_MODULE_THRESHOLD",
    "DPDensities",
    "DensityClampedWarning",
    "ModulePartial",
    "count_above",
    "decoder_linear_groups",
    "dp_densities",
    "dp_keep_mask",
    "dp_prune_tensor",
    "layer_means",
    "layer_outlier_counts",
    "magnitude_sum",
]

DEFAULT_LAMDA = 0.08
DEFAULT_MODULE_THRESHOLD = 5.0  # M: the release's module-level outlier threshold
DEFAULT_LAYER_THRESHOLD = 3.0  # L: hard-coded to 3 at layer level in the release


Groups = Mapping[str, tuple[str, str]]


class DensityClampedWarning(UserWarning):
    """A DP module density fell outside [0, 1] and was clamped (the release would crash)."""


@dataclass(frozen=True)
class ModulePartial:
    """DP's statistics of one prunable tensor, from that tensor alone (the sum: pass 1; the count: pass 2).

    Attributes:
        sum_abs: sum of ``|D|`` (accumulated in float64).
        numel: number of elements.
        outlier_count: ``count(|D| > M * mean(|D|))``, mean over this tensor (docs/recipes.md step 3).
    """

    sum_abs: float
    numel: int
    outlier_count: int

    @property
    def mean_abs(self) -> float:
        """``mean(|D|)``; 0 for an empty tensor."""
        return self.sum_abs / self.numel if self.numel else 0.0

    @property
    def outlier_ratio(self) -> float:
        """``r_lj = 100 * outlier_count / numel`` (percent); 0 for an empty tensor."""
        return float(_percent(self.outlier_count, self.numel))


@dataclass(frozen=True)
class DPDensities:
    """DP keep fractions for one target density (docs/recipes.md steps 1-5).

    Layer dicts are keyed by layer key and module dicts by tensor name, both in the order of
    ``groups`` (layers numerically).

    Attributes:
        density: the target density ``d``.
        lamda: the offset amplitude.
        layer_ratio: ``o_l``, percent of the layer's entries above ``L * layer mean``.
        layer_density: ``D_l = d + lamda * c_l / max |c|``.
        module_ratio: ``r_lj`` as in step 3 (percent), before normalisation.
        module_offset: the step-4 offset ``lamda * r / max |r|``, in ``[-lamda, lamda]``.
        module_density: ``d_lj = D_l + offset``, clamped to [0, 1].
        clamped: tensor names whose ``d_lj`` was clamped.
    """

    density: float
    lamda: float
    layer_ratio: dict[str, float]
    layer_density: dict[str, float]
    module_ratio: dict[str, float]
    module_offset: dict[str, float]
    module_density: dict[str, float]
    clamped: list[str]


def decoder_linear_groups(tensors: Mapping[str, Sequence[int]]) -> dict[str, tuple[str, str]]:
    """The 2-D weights DP prunes, grouped by decoder layer (the modules that are whole tensors).

    A 2-D tensor is prunable when its name contains a layer index (a dotted segment made only of
    digits: ``model.layers.3.``, ``transformer.h.3.``, ``blocks.3.``) and it is neither a bias
    (``.bias``, GPT-OSS's ``_proj_bias``) nor a MoE router (``mlp.gate``, ``mlp.router``). The first
    such segment is the layer; later ones (per-expert MoE weights) stay inside the module key.
    Fused 3-D expert tensors, whose expert slices are modules too, are listed by
    :func:`~mergeengine.kernels.dp_groups.dp_module_groups`, which the ops use.

    Args:
        tensors: tensor name -> shape, e.g. from checkpoint headers.

    Returns:
        Prunable tensor name -> (layer key, module key), ordered by layer prefix, then layer
        index numerically (2 before 10), then input order. The layer key is the name up to the
        index (``model.layers.3``); the module key is the rest without ``.weight``
        (``self_attn.q_proj``).

    Example:
        >>> decoder_linear_groups({"model.layers.0.mlp.up_proj.weight": (8, 4), "lm_head.weight": (9, 4)})
        {'model.layers.0.mlp.up_proj.weight': ('model.layers.0', 'mlp.up_proj')}
    """
    two_d = {name: shape for name, shape in tensors.items() if len(tuple(shape)) == 2}
    return dp_module_groups(two_d).units


def magnitude_sum(delta: Delta) -> tuple[float, int]:
    """``(sum |D|, numel)`` in one read (pass 1; with :func:`count_above`, a tensor's :class:`ModulePartial`).

    float32 sums of :data:`~mergeengine.kernels.chunking.DP_SUM_BLOCK`-entry blocks, the last
    partial block summed in float64, all added in float64: relative error ~1e-9, deterministic,
    ~10x faster than a float64 sum of float32 data. The chunks hold whole blocks, so the sum is
    the whole tensor's, in any chunking of :func:`~mergeengine.kernels.chunking.value_chunks`.
    """
    numel = delta_numel(delta)
    sums = [block_sums(chunk, DP_SUM_BLOCK, torch.float64) for chunk in abs_chunks(delta)]
    if not sums:
        return 0.0, numel
    flat = torch.cat(sums)
    whole = numel // DP_SUM_BLOCK  # the whole blocks, then at most one partial block
    return float(flat[:whole].sum()) + float(flat[whole:].sum()), numel


def count_above(delta: Delta, thresholds: Sequence[float]) -> list[int]:
    """``count(|D| > t)`` for each ``t``, all in one read; each ``t`` is taken exactly (float64).

    ``t'`` is the float32 just below the smallest float32 above ``t``, so ``|D| > t'`` is
    ``|D| > t`` exactly. On the CPU numpy's vectorised abs, compare and count take ~0.25 ns per
    entry (torch's bool compare and ``count_nonzero`` ~1.5); elsewhere ``count_nonzero(hardshrink(D,
    t'))`` (which counts NaN entries as above; on the CPU they are not).
    """
    lambds = []
    for t in thresholds:
        rounded = torch.tensor(t, dtype=torch.float32)
        # rounded up: entries equal to it are above the true threshold, so keep them too
        lambds.append(float(torch.nextafter(rounded, torch.tensor(-math.inf))) if rounded.item() > t
                      else rounded.item())
    totals: list[torch.Tensor | int] = [0 for _ in thresholds]
    scratch: torch.Tensor | None = None
    above: np.ndarray | None = None
    for _, chunk in value_chunks(delta):
        n = chunk.numel()
        if scratch is None:
            scratch = torch.empty(n, dtype=torch.float32, device=chunk.device)
            above = np.empty(n, dtype=bool)
        kept = scratch[:n]
        if chunk.device.type == "cpu":  # numpy: abs, compare, count in ~0.25 ns per entry (torch's count_nonzero: 0.9)
            magnitudes = np.abs(chunk.numpy(), out=kept.numpy())
            for j, lambd in enumerate(lambds):
                totals[j] += int(np.count_nonzero(np.greater(magnitudes, np.float32(lambd), out=above[:n])))
            continue
        for j, lambd in enumerate(lambds):
            if lambd < 0:  # every |D| is above a negative threshold
                totals[j] = totals[j] + n
                continue
            torch.hardshrink(chunk, lambd, out=kept)
            totals[j] = totals[j] + torch.count_nonzero(kept)
    return [int(t) for t in totals]


def layer_means(partials: Mapping[str, ModulePartial], groups: Groups) -> dict[str, float]:
    """After pass 1: ``mean(|D|)`` over each layer's concatenated modules.

    Args:
        partials: tensor name -> its statistics (only ``sum_abs`` and ``numel`` are read), one per
            tensor of ``groups``.
        groups: from :func:`decoder_linear_groups`.

    Returns:
        Layer key -> ``sum of sum_abs / sum of numel`` (0 for a layer without elements), in
        the order of ``groups``.

    Raises:
        ValueError: ``partials`` and ``groups`` do not name the same tensors.
    """
    _check_same_names(partials, groups, "partials")
    sums: dict[str, float] = {}
    numels: dict[str, int] = {}
    for name, (layer, _) in groups.items():
        sums[layer] = sums.get(layer, 0.0) + partials[name].sum_abs
        numels[layer] = numels.get(layer, 0) + partials[name].numel
    return {layer: (sums[layer] / numels[layer] if numels[layer] else 0.0) for layer in sums}


def layer_outlier_counts(tensor_counts: Mapping[str, int], groups: Groups) -> dict[str, int]:
    """Sum the pass-2 counts of each layer's tensors.

    Args:
        tensor_counts: tensor name -> its count of entries above its layer's threshold (:func:`count_above`), one per tensor of
            ``groups``.
        groups: from :func:`decoder_linear_groups`.

    Returns:
        Layer key -> outlier count, in the order of ``groups``.

    Raises:
        ValueError: ``tensor_counts`` and ``groups`` do not name the same tensors.
    """
    _check_same_names(tensor_counts, groups, "tensor_counts")
    counts: dict[str, int] = {}
    for name, (layer, _) in groups.items():
        counts[layer] = counts.get(layer, 0) + int(tensor_counts[name])
    return counts


def _check_dp_inputs(partials: Mapping[str, ModulePartial], layer_counts: Mapping[str, int], groups: Groups,
                     density: float, lamda: float) -> dict[str, int]:
    """:func:`dp_densities`'s argument checks; returns each layer's element count."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if not (math.isfinite(lamda) and lamda >= 0.0):
        raise ValueError(f"lamda must be a finite number >= 0, got {lamda}")
    _check_same_names(partials, groups, "partials")
    layer_numel: dict[str, int] = {}
    for name, (layer, _) in groups.items():
        layer_numel[layer] = layer_numel.get(layer, 0) + partials[name].numel
    missing = [layer for layer in layer_numel if layer not in layer_counts]
    extra = [layer for layer in layer_counts if layer not in layer_numel]
    if missing or extra:
        raise ValueError(f"layer_counts does not match groups: missing {missing}, unexpected {extra}")
    for layer, numel in layer_numel.items():
        if not 0 <= layer_counts[layer] <= numel:
            raise ValueError(f"layer '{layer}': outlier count {layer_counts[layer]} not in [0, {numel}]")
    for name in groups:
        part = partials[name]
        if not 0 <= part.outlier_count <= part.numel:
            raise ValueError(f"'{name}': outlier count {part.outlier_count} not in [0, {part.numel}]")
    return layer_numel


def _clamp(raw: dict[str, float], density: float, lamda: float) -> tuple[dict[str, float], list[str]]:
    """Module densities clamped to [0, 1] (with a :class:`DensityClampedWarning`) and the clamped names."""
    module_density = {name: min(1.0, max(0.0, value)) for name, value in raw.items()}
    clamped = [name for name in raw if module_density[name] != raw[name]]
    if clamped:
        shown = ", ".join(f"{name} ({raw[name]:.4g})" for name in clamped[:10])
        more = f" and {len(clamped) - 10} more" if len(clamped) > 10 else ""
        warnings.warn(
            f"DP module density outside [0, 1] clamped for {len(clamped)} module(s) at density={density}, "
            f"lamda={lamda}: {shown}{more}. Lower lamda or move density away from 0 and 1 to avoid it.",
            DensityClampedWarning,
            stacklevel=3,
        )
    return module_density, clamped


def _offsets(partials: Mapping[str, ModulePartial], layer_counts: Mapping[str, int], layer_numel: dict[str, int],
             groups: Groups) -> tuple[dict[str, Fraction], dict[str, Fraction], dict[str, Fraction],
                                      dict[str, Fraction]]:
    """DP's steps 1-4, exactly: (layer ratios, layer offsets, module ratios, module offsets).

    1. ``o_l = 100 * layer_counts[l] / numel_l``.
    2. ``c = o - mean_l(o)`` (unweighted over layers); ``D_l = d + lamda * c_l / max_l |c_l|``,
       or ``D_l = d`` when all ``c`` are 0 (the offset here is ``c_l / max_l |c_l|``).
    3. ``r_lj = 100 * outlier_count / numel``.
    4. ``r = r / mean(r)`` (unweighted over all modules of all layers); ``r = r - sum(n * r) /
       sum(n)`` with ``n`` the element counts; ``r = r / max |r|`` (times lamda in step 5).
       Offsets are 0 when ``mean(r) = 0`` or when all ``r`` are equal. (The first division
       cancels in the last one; it is kept to follow the paper literally.)
    """
    layer_ratio = {layer: _percent(layer_counts[layer], numel) for layer, numel in layer_numel.items()}
    layer_offset = _normalised(_centred(layer_ratio, {layer: 1 for layer in layer_ratio}))
    module_ratio = {name: _percent(partials[name].outlier_count, partials[name].numel) for name in groups}
    module_offset = {name: Fraction(0) for name in groups}
    ratio_mean = sum(module_ratio.values(), Fraction(0)) / len(module_ratio) if module_ratio else Fraction(0)
    if ratio_mean != 0:
        scaled = {name: ratio / ratio_mean for name, ratio in module_ratio.items()}
        module_offset = _normalised(_centred(scaled, {name: partials[name].numel for name in groups}))
    return layer_ratio, layer_offset, module_ratio, module_offset


def dp_densities(
    partials: Mapping[str, ModulePartial],
    layer_counts: Mapping[str, int],
    groups: Groups,
    density: float,
    lamda: float = DEFAULT_LAMDA,
) -> DPDensities:
    """After pass 2: DP's per-layer and per-module keep fractions (docs/recipes.md steps 1-5).

    Steps 1-4 are the offsets of :func:`_offsets`; step 5 is ``d_lj = D_l + r_lj``, clamped to
    [0, 1] with a :class:`DensityClampedWarning`.

    Steps 1-4 are exact (rational arithmetic); see the module docstring. No offset depends on
    ``d``, so calling this for several ``d`` gives module densities that are non-decreasing in
    ``d`` (what DPA relies on). Because the module offsets have zero numel-weighted mean over
    the model, the numel-weighted mean of ``d_lj`` equals ``d`` when all layers hold the same
    number of elements and nothing is clamped (it is not ``D_l`` layer by layer).

    Args:
        partials: tensor name -> the tensor's statistics (:class:`ModulePartial`).
        layer_counts: layer key -> pass-2 outlier count (:func:`layer_outlier_counts`).
        groups: from :func:`decoder_linear_groups`; defines the modules and layers.
        density: target keep fraction ``d`` in [0, 1].
        lamda: offset amplitude (the paper's lambda), >= 0.

    Returns:
        A :class:`DPDensities`.

    Raises:
        ValueError: a parameter is out of range, or the inputs do not name the same tensors and
            layers, or a count exceeds its element count.

    Example:
        >>> dens = dp_densities(partials, layer_outlier_counts(counts, groups), groups, 0.2, lamda=0.08)
        >>> dens.module_density[name]  # 0.2 + layer offset + module offset, each within +-0.08
    """
    layer_numel = _check_dp_inputs(partials, layer_counts, groups, density, lamda)

    layer_ratio, layer_offset, module_ratio, module_offset = _offsets(partials, layer_counts, layer_numel, groups)
    layer_density = {layer: density + lamda * float(offset) for layer, offset in layer_offset.items()}

    # Step 5: module densities.
    raw = {
        name: layer_density[layer] + lamda * float(module_offset[name]) for name, (layer, _) in groups.items()
    }
    module_density, clamped = _clamp(raw, density, lamda)
    return DPDensities(
        density=density,
        lamda=lamda,
        layer_ratio={layer: float(ratio) for layer, ratio in layer_ratio.items()},
        layer_density=layer_density,
        module_ratio={name: float(ratio) for name, ratio in module_ratio.items()},
        module_offset={name: lamda * float(offset) for name, offset in module_offset.items()},
        module_density=module_density,
        clamped=clamped,
    )


def dp_keep_mask(delta: torch.Tensor, density: float, rule: PruneRule = "exact") -> torch.Tensor:
    """Step 6's mask: entries whose magnitude is strictly above the k-th smallest magnitude.

    ``k = pruned_count(numel, density, rule)`` (``exact``: step 6's ``floor(numel * (1 - density))``; ``release``: the
    release's count, see :mod:`~mergeengine.kernels.prune_rule`); ``k = 0`` keeps everything. Magnitudes are ranked in
    float32. Masks at increasing density are nested, ties included. NaN entries are kept.

    Args:
        delta: any float tensor.
        density: keep fraction in [0, 1].
        rule: how many magnitudes the density drops (``exact`` or ``release``).

    Returns:
        A bool tensor of ``delta``'s shape.

    Raises:
        ValueError: ``density`` is outside [0, 1].
    """
    k = pruned_count(delta.numel(), density, rule)
    if k == 0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    threshold = kth_smallest_abs(delta, k)
    # not (|D| <= t): |D| > t, and NaN too (it ranks above inf, as in every selection here), so
    # a NaN delta reaches the run's finite check instead of being dropped silently
    return torch.le(delta.detach().abs().float(), threshold.to(delta.device)).logical_not_()


def dp_prune_tensor(delta: torch.Tensor, density: float, rule: PruneRule = "exact") -> torch.Tensor:
    """Pass 3 (docs/recipes.md step 6): magnitude-prune one delta at its DP module density, no rescale.

    Args:
        delta: the tensor's delta.
        density: its ``d_lj`` from :func:`dp_densities` (``DPDensities.module_density[name]``).
        rule: how many magnitudes the density drops (``exact`` or ``release``).

    Returns:
        ``delta`` where :func:`dp_keep_mask` holds, 0 elsewhere; same shape and dtype.

    Raises:
        ValueError: ``density`` is outside [0, 1].

    Example:
        >>> dp_prune_tensor(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    return torch.where(
        dp_keep_mask(delta, density, rule), delta, torch.zeros((), dtype=delta.dtype, device=delta.device)
    )



# --------------------------------------------------------------------------------------------
# helpers


def _percent(count: int, numel: int) -> Fraction:
    return Fraction(100 * int(count), int(numel)) if numel else Fraction(0)


def _centred(values: dict[str, Fraction], weights: Mapping[str, int]) -> dict[str, Fraction]:
    total_weight = sum(weights[key] for key in values)
    if total_weight == 0:
        return dict(values)
    mean = sum((weights[key] * value for key, value in values.items()), Fraction(0)) / total_weight
    return {key: value - mean for key, value in values.items()}


def _normalised(values: dict[str, Fraction]) -> dict[str, Fraction]:
    largest = max((abs(value) for value in values.values()), default=Fraction(0))
    if largest == 0:
        return {key: Fraction(0) for key in values}
    return {key: value / largest for key, value in values.items()}


def _check_same_names(values: Mapping[str, object], groups: Groups, what: str) -> None:
    missing = [name for name in groups if name not in values]
    extra = [name for name in values if name not in groups]
    if missing or extra:
        raise ValueError(f"{what} does not match groups: missing {missing[:5]}, unexpected {extra[:5]}")

