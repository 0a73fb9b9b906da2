"""DP's whole-model statistics as two streaming reductions (shared by dp_prune and dpa_amplify).

Pass 1 (``module_stats``): per decoder-linear tensor, sum |D| and numel.
Pass 2 (``layer_outliers``): per tensor, both outlier counts in one read: count(|D| > M * module
mean) and count(|D| > L * layer mean), the means coming from pass 1. (The module count could be
taken in pass 1 only with a second read of the tensor, since it needs the tensor's own mean.)
``finish`` of pass 2 yields the module densities for each requested target density.

Every parameter may be scheduled (differ per tensor, see :mod:`mergeengine.recipe.schedule`): a
module's outlier counts use its own thresholds, and its density is DP's at its own target ``d``
and ``lamda`` (the offsets, which do not depend on them, computed once for the whole model):
``d_lj = d_lj' + lamda_lj × (layer offset_l + module offset_lj)``, ``d_lj'`` the module's target.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import Field

from mergeengine.kernels import dp_density as dppa
from mergeengine.kernels.dp_groups import unit_deltas
from mergeengine.kernels.prune_rule import PruneRule, pruned_count
from mergeengine.ops.base import Op, Reduction, StepPlan
from mergeengine.runtime import numpy_threads

LOG = logging.getLogger(__name__)

Lamda = Field(dppa.DEFAULT_LAMDA, ge=0, le=1, description="Spread of the per-layer / per-module densities.")
ModuleThreshold = Field(dppa.DEFAULT_MODULE_THRESHOLD, gt=0, description="Module outlier: |D| > this * module mean.")
LayerThreshold = Field(dppa.DEFAULT_LAYER_THRESHOLD, gt=0, description="Layer outlier: |D| > this * layer mean.")
PruneRuleField = Field("exact", description="exact: drop floor(numel * (1 - d)) smallest magnitudes; release: the "
                       "DPPA release's sort(|W|)[int(numel * (1 - d))] threshold, pruning every |W| <= it.")


@dataclass(frozen=True)
class DPSettings:
    """A DP module's parameters (its tensor's, with the step's schedules resolved).

    Attributes:
        targets: the target densities ``d`` (one for dp_prune, one per partition for dpa_amplify).
        lamda: the offset amplitude.
        module_threshold: ``M``.
        layer_threshold: ``L``.
    """

    targets: tuple[float, ...]
    lamda: float
    module_threshold: float
    layer_threshold: float


def dp_settings(op: Op, plan: StepPlan, units: Mapping[str, list[str]],
                targets: Callable[[Any], tuple[float, ...]]) -> dict[str, DPSettings]:
    """Each DP module's settings: its tensor's values of the step's fields (``targets``: the
    target densities of a step)."""
    out: dict[str, DPSettings] = {}
    for tensor, keys in units.items():
        s = op.for_tensor(plan, tensor).step
        setting = DPSettings(targets(s), s.lamda, s.module_threshold, s.layer_threshold)  # type: ignore[attr-defined]
        out.update(dict.fromkeys(keys, setting))
    return out


def dp_reductions(
    step: str,
    groups: dict[str, tuple[str, str]],
    settings: Mapping[str, DPSettings],
    *,
    source: Callable[[list[torch.Tensor]], Any] = lambda inputs: inputs[0],
    units: Mapping[str, list[str]] | None = None,
) -> list[Reduction]:
    """The two reductions; the result ``stats["layer_outliers"]`` is a list of DPDensities, one per target.

    ``settings``: DP module key -> its parameters (:func:`dp_settings`). ``source`` picks what
    the statistics read from a task's inputs: the delta, or the ``(model, base)`` pair of a fused
    diff (see :meth:`DeltaOp.fuse_diffs`). ``units``: tensor -> its DP modules (``groups``' keys,
    one per expert of a fused expert tensor); default: one each.
    """
    units = units if units is not None else {name: [name] for name in groups}
    names = list(units)

    def map_module(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> list[tuple[float, int]]:
        return [dppa.magnitude_sum(sub) for _, sub in unit_deltas(source(inputs), units[name])]

    def finish_module(acc: dict[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
        sums = {key: value for name in names for key, value in zip(units[name], acc[name], strict=True)}
        means = dppa.layer_means({n: dppa.ModulePartial(s, k, 0) for n, (s, k) in sums.items()}, groups)
        return {"sums": sums, "layer_means": means}

    def map_layer(name: str, inputs: list[torch.Tensor], stats: Mapping[str, Any]) -> list[tuple[int, int]]:
        return [unit_outliers(key, sub, stats) for key, sub in unit_deltas(source(inputs), units[name])]

    def unit_outliers(key: str, delta: Any, stats: Mapping[str, Any]) -> tuple[int, int]:
        sum_abs, numel = stats["module_stats"]["sums"][key]
        mean = stats["module_stats"]["layer_means"][groups[key][0]]
        if not numel:
            return 0, 0
        s = settings[key]
        with numpy_threads():  # both counts in one read; numpy's count: torch's second thread would spin
            module, layer = dppa.count_above(delta, [s.module_threshold * sum_abs / numel, s.layer_threshold * mean])
        return module, layer

    def finish_layer(raw: dict[str, list[tuple[int, int]]], stats: Mapping[str, Any]) -> list[dppa.DPDensities]:
        acc = {key: value for name in names for key, value in zip(units[name], raw[name], strict=True)}
        counts = dppa.layer_outlier_counts({n: v[1] for n, v in acc.items()}, groups)
        sums = stats["module_stats"]["sums"]
        partials = {n: dppa.ModulePartial(sum_abs=sums[n][0], numel=sums[n][1], outlier_count=acc[n][0])
                    for n in groups}
        count = len(next(iter(settings.values())).targets) if settings else 0
        return [module_densities(step, partials, counts, groups,
                                 {key: (s.targets[k], s.lamda) for key, s in settings.items()}) for k in range(count)]

    return [
        Reduction("module_stats", names, map_module, finish_module, label="magnitude sums"),
        Reduction("layer_outliers", names, map_layer, finish_layer, after=["module_stats"], label="outlier counts"),
    ]


def module_densities(step: str, partials: Mapping[str, dppa.ModulePartial], counts: Mapping[str, int],
                     groups: dict[str, tuple[str, str]], targets: Mapping[str, tuple[float, float]]) -> dppa.DPDensities:
    """DP's densities when each module has its own ``(d, lamda)`` (``targets``, by module key).

    One :func:`~mergeengine.kernels.dppa.dp_densities` per distinct pair (its offsets do not
    depend on the pair); each module takes its own pair's figures. A layer whose modules do not
    share a pair has no single layer density (None), nor the step a single ``density`` or
    ``lamda`` when they vary. Clamped modules are logged as warnings.
    """
    pairs = list(dict.fromkeys(targets[key] for key in groups)) or [(0.0, dppa.DEFAULT_LAMDA)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dppa.DensityClampedWarning)
        calls = {pair: dppa.dp_densities(partials, counts, groups, *pair) for pair in pairs}
    first = calls[pairs[0]]
    if len(pairs) == 1:
        for w in caught:
            LOG.warning("step '%s': %s", step, w.message)
        return first
    own = {key: calls[targets[key]] for key in groups}
    clamped = [key for key in groups if key in own[key].clamped]
    if clamped:
        LOG.warning("step '%s': DP module density outside [0, 1] clamped for %d module(s): %s", step, len(clamped),
                    ", ".join(clamped[:10]) + (f" and {len(clamped) - 10} more" if len(clamped) > 10 else ""))
    layer_pairs: dict[str, set[tuple[float, float]]] = {}
    for key, (layer, _) in groups.items():
        layer_pairs.setdefault(layer, set()).add(targets[key])
    ds, lamdas = {d for d, _ in pairs}, {lam for _, lam in pairs}
    return replace(
        first,
        density=ds.pop() if len(ds) == 1 else None,
        lamda=lamdas.pop() if len(lamdas) == 1 else None,
        layer_density={layer: calls[next(iter(ps))].layer_density[layer] if len(ps) == 1 else None
                       for layer, ps in layer_pairs.items()},
        module_offset={key: own[key].module_offset[key] for key in groups},
        module_density={key: own[key].module_density[key] for key in groups},
        clamped=clamped,
    )


def density_report(densities: dppa.DPDensities, groups: dict[str, tuple[str, str]],
                   numels: dict[str, int], rule: PruneRule = "exact",
                   targets: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """JSON-ready per-layer and per-module figures for ``dppa_report.json``.

    ``kept`` is the planned count ``numel - k`` (``k`` by the step's prune ``rule``); entries tied at the threshold or exactly 0 can
    make the nonzero count of the output smaller. Where a schedule makes ``d`` or ``lamda`` vary,
    each module also shows its own (``targets``: module key -> ``(d, lamda)``).
    """
    layers: dict[str, Any] = {}
    for layer in densities.layer_density:
        layers[layer] = {
            "outlier_ratio": densities.layer_ratio[layer],
            "density": densities.layer_density[layer],
            "modules": {},
        }
    for name, (layer, module) in groups.items():
        layers[layer]["modules"][module] = {
            "tensor": name,
            "outlier_ratio": densities.module_ratio[name],
            "offset": densities.module_offset[name],
            "density": densities.module_density[name],
            "numel": numels[name],
            "kept": numels[name] - pruned_count(numels[name], densities.module_density[name], rule),
        }
        if targets is not None and densities.density is None:
            layers[layer]["modules"][module]["target_density"] = targets[name][0]
        if targets is not None and densities.lamda is None:
            layers[layer]["modules"][module]["lamda"] = targets[name][1]
    return {"target_density": densities.density, "lamda": densities.lamda, "clamped": densities.clamped,
            "layers": layers}


def log_summary(step: str, densities: dppa.DPDensities, groups: dict[str, tuple[str, str]]) -> None:
    """``run -v``: min/mean/max module density per layer."""
    per_layer: dict[str, list[float]] = {}
    for name, (layer, _) in groups.items():
        per_layer.setdefault(layer, []).append(densities.module_density[name])
    LOG.info("step '%s': DP at density %s (lamda %s)", step, _shown(densities.density), _shown(densities.lamda))
    for layer, ds in per_layer.items():
        LOG.info("  %s: outlier ratio %.3f%%, density min %.4f mean %.4f max %.4f", layer,
                 densities.layer_ratio[layer], min(ds), sum(ds) / len(ds), max(ds))


def _shown(value: float | None) -> str:
    return "scheduled" if value is None else f"{value:.3f}"


def explain_dp(settings: Mapping[str, DPSettings], keys: list[str], names: list[str]) -> list[str]:
    """``plan --explain`` lines for one tensor's DP modules (``keys``; none: it passes dense).

    ``names``: what each target density is called (``density``, ``partitions.0.density``...).
    Modules with the same settings (the experts of a fused tensor) share a line.
    """
    if not keys:
        return ["dense: not a decoder linear weight, DP passes it through"]
    lines = []
    for s in dict.fromkeys(settings[key] for key in keys):
        d = ", ".join(f"{n} d={t:.6g}" for n, t in zip(names, s.targets, strict=True))
        lines.append(f"DP: {d}; module density = d + {s.lamda:.6g} x (layer offset + module offset), each "
                     "offset in [-1, 1] from the statistics passes (run writes them to dppa_report.json); "
                     f"outliers: |D| > {s.module_threshold:.6g} x module mean, > {s.layer_threshold:.6g} x layer mean")
    return lines
