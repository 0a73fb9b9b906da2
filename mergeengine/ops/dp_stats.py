"""DP's whole-model statistics as two streaming reductions (shared by dp_prune and dpa_amplify).

Pass 1 (``module_stats``): per decoder-linear tensor, sum |D| and numel.
Pass 2 (``layer_outliers``): per tensor, both outlier counts in one read: count(|D| > M * module
mean) and count(|D| > L * layer mean), the means coming from pass 1. (The module count could be
taken in pass 1 only with a second read of the tensor, since it needs the tensor's own mean.)
``finish`` of pass 2 yields the module densities for each requested target density.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field

from mergeengine.kernels import dp_density as dppa
from mergeengine.kernels.dp_groups import unit_deltas
from mergeengine.kernels.prune_rule import PruneRule, pruned_count
from mergeengine.ops.base import Reduction
from mergeengine.runtime import numpy_threads

LOG = logging.getLogger(__name__)

Lamda = Field(dppa.DEFAULT_LAMDA, ge=0, le=1, description="Spread of the per-layer / per-module densities.")
ModuleThreshold = Field(dppa.DEFAULT_MODULE_THRESHOLD, gt=0, description="Module outlier: |D| > this * module mean.")
LayerThreshold = Field(dppa.DEFAULT_LAYER_THRESHOLD, gt=0, description="Layer outlier: |D| > this * layer mean.")
PruneRuleField = Field("exact", description="exact: drop floor(numel * (1 - d)) smallest magnitudes; release: the "
                       "DPPA release's sort(|W|)[int(numel * (1 - d))] threshold, pruning every |W| <= it.")


def dp_reductions(
    step: str,
    groups: dict[str, tuple[str, str]],
    targets: list[float],
    *,
    lamda: float,
    module_threshold: float,
    layer_threshold: float,
    source: Callable[[list[torch.Tensor]], Any] = lambda inputs: inputs[0],
    units: Mapping[str, list[str]] | None = None,
) -> list[Reduction]:
    """The two reductions; the result ``stats["densities"]`` is a list of DPDensities, one per target.

    ``source`` picks what the statistics read from a task's inputs: the delta, or the
    ``(model, base)`` pair of a fused diff (see :meth:`DeltaOp.fuse_diffs`). ``units``: tensor ->
    its DP modules (``groups``' keys, one per expert of a fused expert tensor); default: one each.
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
        with numpy_threads():  # both counts in one read; numpy's count: torch's second thread would spin
            module, layer = dppa.count_above(delta, [module_threshold * sum_abs / numel, layer_threshold * mean])
        return module, layer

    def finish_layer(raw: dict[str, list[tuple[int, int]]], stats: Mapping[str, Any]) -> list[dppa.DPDensities]:
        acc = {key: value for name in names for key, value in zip(units[name], raw[name], strict=True)}
        counts = dppa.layer_outlier_counts({n: v[1] for n, v in acc.items()}, groups)
        sums = stats["module_stats"]["sums"]
        partials = {n: dppa.ModulePartial(sum_abs=sums[n][0], numel=sums[n][1], outlier_count=acc[n][0])
                    for n in groups}
        out = []
        for d in targets:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", dppa.DensityClampedWarning)
                out.append(dppa.dp_densities(partials, counts, groups, d, lamda))
            for w in caught:
                LOG.warning("step '%s': %s", step, w.message)
        return out

    return [
        Reduction("module_stats", names, map_module, finish_module, label="magnitude sums"),
        Reduction("layer_outliers", names, map_layer, finish_layer, after=["module_stats"], label="outlier counts"),
    ]


def density_report(densities: dppa.DPDensities, groups: dict[str, tuple[str, str]],
                   numels: dict[str, int], rule: PruneRule = "exact") -> dict[str, Any]:
    """JSON-ready per-layer and per-module figures for ``dppa_report.json``.

    ``kept`` is the planned count ``numel - k`` (``k`` by the step's prune ``rule``); entries tied at the threshold or exactly 0 can
    make the nonzero count of the output smaller.
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
    return {"target_density": densities.density, "lamda": densities.lamda, "clamped": densities.clamped,
            "layers": layers}


def log_summary(step: str, densities: dppa.DPDensities, groups: dict[str, tuple[str, str]]) -> None:
    """``run -v``: min/mean/max module density per layer."""
    per_layer: dict[str, list[float]] = {}
    for name, (layer, _) in groups.items():
        per_layer.setdefault(layer, []).append(densities.module_density[name])
    LOG.info("step '%s': DP at density %.3f (lamda %.3f)", step, densities.density, densities.lamda)
    for layer, ds in per_layer.items():
        LOG.info("  %s: outlier ratio %.3f%%, density min %.4f mean %.4f max %.4f", layer,
                 densities.layer_ratio[layer], min(ds), sum(ds) / len(ds), max(ds))
