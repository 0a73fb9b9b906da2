"""Sweeps over λ and DPA factors as linear combinations of deltas that mergeengine built once.

Every merge of Table 2 is ``base + λ · F`` with ``F`` fixed by the method (task arithmetic,
TIES and DARE-TIES scale their merged delta by λ last), and a DP+DPA delta with the release's
factor rule is linear in its factors for fixed partitions: with partitions ``(d/2, s1)`` and
``(d, s2)``, ``factors: release`` and ``dense_scale: max``, the amplified delta is
``max(s1, s2) · A + s2 · B``, where ``A`` is the top-``d/2`` partition plus the tensors DP
leaves dense and ``B`` the rest of the kept delta (DP's partitions depend on the density, never
on the factors). So:

* ``F`` is ``build(recipe at λ = 1) - base``, one mergeengine build per row and seed;
* ``A`` and ``B`` of an expert at a density are two mergeengine builds of the same
  ``dpa_amplify`` step with ``factors: own``: scales ``(1, 0)`` with ``dense_scale: 1``, and
  ``(0, 1)`` with ``dense_scale: 0``;
* a candidate (a λ of the grid, a search trial) is written into the evaluation model's
  parameters as ``base + Σ c_k · component_k``, with no build and no copy of the model.

The search itself stays :func:`mergeengine.search.run_search` (coordinate ascent, the engine's
scorer on the validation tasks): :class:`LinearExecutor` only replaces how a trial's candidate is
made. Every number reported on test comes from a real build of the chosen recipe, and
:meth:`LinearModels.check` compares that build with the in-memory candidate tensor by tensor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

#: a sparse tensor delta: flat int32 indices and their float32 values
Sparse = tuple[torch.Tensor, torch.Tensor]
#: below this share of non-zero entries a component tensor is stored sparse
SPARSE_BELOW = 0.3


@dataclass
class Component:
    """A delta over some of the model's tensors, dense or sparse per tensor (all-zero ones dropped)."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    sparse: dict[str, Sparse] = field(default_factory=dict)

    @classmethod
    def of(cls, built: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> Component:
        """``built - base`` (``built``: the tensors of a save step, in float32)."""
        comp = cls()
        for name, tensor in built.items():
            delta = torch.sub(tensor, base[name])
            count = int(torch.count_nonzero(delta))
            if count == 0:
                continue
            if count < SPARSE_BELOW * delta.numel():
                flat = delta.view(-1)
                nz = torch.nonzero(flat).view(-1)
                comp.sparse[name] = (nz.to(torch.int32), flat[nz])
            else:
                comp.dense[name] = delta
        return comp

    def add_to(self, name: str, param: torch.Tensor, coef: float) -> None:
        """``param += coef · self[name]`` in place (nothing when the tensor is not in this delta)."""
        if name in self.dense:
            param.add_(self.dense[name], alpha=coef)
        elif name in self.sparse:
            index, values = self.sparse[name]
            param.view(-1).index_add_(0, index, values, alpha=coef)


Terms = list[tuple[float, Component]]


class LinearModels:
    """Writes ``base + Σ c_k · component_k`` into a reusable ``transformers`` model."""

    def __init__(self, model: Any, base_folder: Path) -> None:
        from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

        self.model = model
        ckpt = SafetensorsCheckpoint(base_folder)  # float32 tensors mapped from the file: parallel runs share its pages
        self.base = {n: ckpt.read(n) for n in ckpt.tensors()}
        if any(t.dtype != torch.float32 for t in self.base.values()):
            raise RuntimeError(f"{base_folder}: the linear sweep needs a float32 base")
        self.params = dict(model.state_dict())  # shares storage with the parameters
        missing = sorted(set(self.base) - set(self.params))
        if missing:
            raise RuntimeError(f"base tensors missing from the model: {missing[:3]}")
        self.seconds = 0.0
        self.candidates = 0

    def component(self, built: dict[str, torch.Tensor]) -> Component:
        """A build's delta to the base."""
        return Component.of(built, self.base)

    @torch.no_grad()
    def load(self, terms: Terms) -> None:
        """Set the model to ``base + Σ c · component``."""
        t0 = time.perf_counter()
        for name, base in self.base.items():
            param = self.params[name]
            param.copy_(base)
            for coef, comp in terms:
                comp.add_to(name, param, coef)
        self.candidates += 1
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def check(self, built: dict[str, torch.Tensor]) -> dict[str, float]:
        """How far the model's current (in-memory) tensors are from a real build's.

        Returns the largest absolute difference over all tensors, and that difference relative to
        the largest |built - base| (the size of the merged delta).
        """
        worst = delta_max = 0.0
        for name, tensor in built.items():
            t = tensor.float()
            worst = max(worst, float(torch.sub(self.params[name], t).abs_().max()))
            delta_max = max(delta_max, float(torch.sub(t, self.base[name]).abs_().max()))
        return {"max_abs_diff": worst, "max_abs_delta": delta_max,
                "relative": worst / delta_max if delta_max else 0.0}


# --- DP+DPA components and the candidates of a recipe ------------------------------------------------


def component_steps(sparsify: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ``dpa_amplify`` steps whose outputs are ``A`` and ``B`` of ``sparsify`` (see the module doc)."""
    _check_dpa(sparsify)
    (p1, p2) = sparsify["partitions"]
    a = sparsify | {"factors": "own", "dense_scale": 1.0,
                    "partitions": [{"density": p1["density"], "scale": 1.0}, {"density": p2["density"], "scale": 0.0}]}
    b = sparsify | {"factors": "own", "dense_scale": 0.0,
                    "partitions": [{"density": p1["density"], "scale": 0.0}, {"density": p2["density"], "scale": 1.0}]}
    return a, b


def _check_dpa(step: dict[str, Any]) -> None:
    if step.get("op") != "dpa_amplify" or step.get("factors") != "release" or step.get("dense_scale") != "max" \
            or len(step.get("partitions", ())) != 2:
        raise ValueError(f"step '{step.get('id')}': the linear sweep needs dpa_amplify with two partitions, "
                         "factors: release and dense_scale: max")


def dpa_key(steps: dict[str, dict[str, Any]], step: dict[str, Any]) -> tuple[str, tuple[float, ...]]:
    """What a DP+DPA step's components depend on: the fine-tune its input diff reads, and its
    partition densities (``steps``: the recipe's steps by id; every recipe here diffs against one base)."""
    diff = steps[step["input"]]
    if diff["op"] != "diff":
        raise ValueError(f"step '{step['id']}': the linear sweep needs a diff as the input")
    return str(steps[diff["model"]]["model"]), tuple(float(p["density"]) for p in step["partitions"])


def recipe_terms(recipe: dict[str, Any], components: dict[tuple[str, tuple[float, ...]], tuple[Component, Component]]
                 ) -> Terms:
    """The linear terms of a recipe whose output is one DP+DPA delta or a task-arithmetic merge of them.

    Raises:
        ValueError: the recipe has another shape, or a step's components were not built.
    """
    from mergeengine.kernels.dpa_scale import release_factors

    steps = {s["id"]: s for s in recipe["steps"]}
    save = next(s for s in recipe["steps"] if s["op"] == "save")
    node = steps[save["input"]]
    if node["op"] == "merge":
        if node["method"] != "task_arithmetic" or "weights" in node:
            raise ValueError(f"step '{node['id']}': the linear sweep needs an unweighted task_arithmetic merge")
        lam, inputs = float(node.get("lambda", 1.0)), [steps[i] for i in node["inputs"]]
    else:
        lam, inputs = 1.0, [node]
    terms: Terms = []
    for step in inputs:
        _check_dpa(step)
        key = dpa_key(steps, step)
        if key not in components:
            raise ValueError(f"step '{step['id']}': no components built for {key}")
        a, b = components[key]
        factors = release_factors([float(p["scale"]) for p in step["partitions"]])[0]
        terms += [(lam * factors[0], a), (lam * factors[1], b)]
    return terms


class LinearExecutor:
    """A :func:`mergeengine.search.run_search` executor whose trials are in-memory linear candidates.

    Each job's candidate recipe (the search's point written in) becomes its :func:`recipe_terms`;
    the model is set to it and scored by the engine's own scorer of the search's tasks.
    """

    workers = 1
    kind = "linear"
    device = "cpu"

    def __init__(self, models: LinearModels, tokenizer: Any,
                 components: dict[tuple[str, tuple[float, ...]], tuple[Component, Component]]) -> None:
        self.models, self.tokenizer, self.components = models, tokenizer, components
        self._scorers: dict[str, Any] = {}

    def _scorer(self, spec_json: str, base_dir: Path) -> Any:
        from mergeengine.recipe.schema import SearchSpec
        from mergeengine.search.trial import task_scorer

        if spec_json not in self._scorers:
            self._scorers[spec_json] = task_scorer(SearchSpec.model_validate_json(spec_json), base_dir)
        return self._scorers[spec_json]

    def run(self, jobs: Sequence[Any]) -> Iterator[Any]:
        """Score each job's candidate in turn."""
        from mergeengine.search.trial import TrialOutcome

        for job in jobs:
            if job.index < 0:
                raise ValueError("the linear executor scores candidates only: give the search numeric references")
            t0 = time.perf_counter()
            self.models.load(recipe_terms(yaml.safe_load(job.recipe_text), self.components))
            scorer = self._scorer(job.spec, Path(job.recipe_path).resolve().parent)
            scores = scorer(self.models.model, self.tokenizer)
            yield TrialOutcome(job.index, job.params, scores, round(time.perf_counter() - t0, 4), "linear")

    def close(self) -> None:
        """Nothing to release."""


__all__ = ["Component", "LinearExecutor", "LinearModels", "component_steps", "dpa_key", "recipe_terms"]
