"""The benchmark's merges as mergeengine recipes and equivalent mergekit configs.

Every merge uses weight 1 for each fine-tune and writes bf16. Equivalences with mergekit 0.1.5:

* ``linear``: mean of the fine-tunes (mergekit normalizes the weights by default).
* ``task_arithmetic``: ``base + sum_i (ft_i - base)`` (lambda 1).
* ``ties``: per-tensor top-20% trim, sign election, disjoint mean; with equal weights the
  unweighted vote (mergeengine's default) is mergekit's weighted vote.
* ``dare_ties``: drop 80% at random, rescale to the L1 norm (mergekit's rescale), TIES vote.
* ``slerp``: base and the first fine-tune, ``t = 0.5`` (one angle per tensor, mergekit's rule).
* ``model_stock``: base + every fine-tune, one ratio per tensor (``filter_wise: false``).
* ``della``: MAGPRUNE at density 0.4, epsilon 0.1, rescaled to the L1 norm (mergekit's
  ``rescale: true``), TIES vote; per-tensor random draws differ between the tools.
* ``sce``: ``select_topk: 0.5``.
* ``dppa`` (mergeengine only): diff -> dpa_amplify (partitions (0.1, 1.8), (0.2, 1.0)) on two
  fine-tunes -> task_arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dppa", "slerp", "model_stock", "della", "sce")
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock", "della", "sce")
#: the merge step's fields of the methods whose inputs are the fine-tuned models themselves
MODEL_INPUT_MERGES = {
    "slerp": "method: slerp, base: base, inputs: [{first}], t: 0.5",
    "model_stock": "method: model_stock, base: base, inputs: [{all}]",
    "della": "method: della, base: base, inputs: [{all}], weights: [{ones}], density: 0.4, epsilon: 0.1, rescale: l1",
    "sce": "method: sce, base: base, inputs: [{all}], select_topk: 0.5",
}
#: mergekit's per-model parameters and method-wide parameters for those methods
MERGEKIT_PARAMS = {
    "slerp": ("", "parameters: {t: 0.5}"),
    "model_stock": ("", ""),
    "della": ("weight: 1.0, density: 0.4, epsilon: 0.1", ""),
    "sce": ("", "parameters: {select_topk: 0.5}"),
}


def _q(p: Path) -> str:
    return json.dumps(str(p))


def engine_recipe(method: str, models: dict[str, Path], fine_tunes: list[str], out: Path) -> str:
    """A mergeengine recipe (YAML text) for ``method`` over ``models`` (role -> folder)."""
    if method == "dppa":
        fine_tunes = fine_tunes[:2]
    if method == "slerp":
        fine_tunes = fine_tunes[:1]
    lines = [f"# mergeengine performance benchmark: {method}", f"name: bench-{method}", "seed: 0", "steps:"]
    if method != "linear":
        lines.append(f"  - {{id: base, op: load, model: {_q(models['base'])}}}")
    for ft in fine_tunes:
        lines.append(f"  - {{id: {ft}, op: load, model: {_q(models[ft])}}}")
    deltas = []
    if method in MODEL_INPUT_MERGES:
        merge = MODEL_INPUT_MERGES[method].format(first=fine_tunes[0], all=", ".join(fine_tunes),
                                                  ones=", ".join("1.0" for _ in fine_tunes))
        lines.append(f"  - {{id: merged, op: merge, {merge}}}")
        lines.append(f"  - {{id: out, op: save, input: merged, path: {_q(out)}, dtype: bfloat16}}")
        return "\n".join(lines) + "\n"
    if method != "linear":
        for ft in fine_tunes:
            lines.append(f"  - {{id: d_{ft}, op: diff, model: {ft}, base: base}}")
            deltas.append(f"d_{ft}")
    ones = ", ".join("1.0" for _ in fine_tunes)
    if method == "linear":
        merge = f"method: linear, inputs: [{', '.join(fine_tunes)}], weights: [{ones}]"
    elif method == "task_arithmetic":
        merge = f"method: task_arithmetic, base: base, inputs: [{', '.join(deltas)}], weights: [{ones}], lambda: 1.0"
    elif method == "ties":
        merge = (f"method: ties, base: base, inputs: [{', '.join(deltas)}], weights: [{ones}], density: 0.2, "
                 "trim_scope: tensor, vote: unweighted")
    elif method == "dare_ties":
        merge = (f"method: dare_ties, base: base, inputs: [{', '.join(deltas)}], weights: [{ones}], density: 0.2, "
                 "rescale: l1")
    elif method == "dppa":
        amplified = []
        for d in deltas:
            lines.append(f"  - {{id: a_{d}, op: dpa_amplify, input: {d}, "
                         "partitions: [{density: 0.1, scale: 1.8}, {density: 0.2, scale: 1.0}]}")
            amplified.append(f"a_{d}")
        merge = f"method: task_arithmetic, base: base, inputs: [{', '.join(amplified)}], lambda: 1.0"
    else:
        raise ValueError(f"unknown method {method}")
    lines.append(f"  - {{id: merged, op: merge, {merge}}}")
    lines.append(f"  - {{id: out, op: save, input: merged, path: {_q(out)}, dtype: bfloat16}}")
    return "\n".join(lines) + "\n"


def mergekit_config(method: str, models: dict[str, Path], fine_tunes: list[str]) -> str:
    """The equivalent mergekit YAML config for ``method`` (not for ``dppa``)."""
    if method not in MERGEKIT_METHODS:
        raise ValueError(f"mergekit has no equivalent of {method}")
    lines = [f"# mergekit equivalent of the mergeengine benchmark's {method}", f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {_q(models['base'])}")
    per_model, method_wide = MERGEKIT_PARAMS.get(method, ("weight: 1.0", ""))
    if method in ("ties", "dare_ties"):
        per_model += ", density: 0.2"
    if method_wide:
        lines.append(method_wide)
    lines.append("models:")
    for ft in fine_tunes[:1] if method == "slerp" else fine_tunes:
        lines.append(f"  - model: {_q(models[ft])}")
        if per_model:
            lines.append(f"    parameters: {{{per_model}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def inputs_of(method: str, fine_tunes: list[str]) -> list[str]:
    """Roles whose weights a method reads."""
    if method == "linear":
        return list(fine_tunes)
    if method == "dppa":
        return ["base", *fine_tunes[:2]]
    if method == "slerp":
        return ["base", fine_tunes[0]]
    return ["base", *fine_tunes]
