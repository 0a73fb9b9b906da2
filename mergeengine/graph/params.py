"""Per-tensor parameters: the recipe's schedules resolved for every output tensor of a step.

The planner calls :func:`resolve_schedules` once headers are known (so a filter that matches
nothing, on a field without default, fails before any weight is read); the executor hands each
task the op with its values (:meth:`mergeengine.ops.base.Op.with_params`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergeengine.errors import RecipeError
from mergeengine.graph.steps import StepGraph
from mergeengine.ops.base import Op, StepPlan
from mergeengine.recipe.schedule import LAYER_INDEX, FieldSchedule, num_layers_of, resolve_field

StepParams = dict[str, dict[str, Any]]  # tensor -> field -> value (python names; ``partitions.0.density``)


def _field_name(op: Op, name: str) -> str:
    """The step model's attribute for a YAML field name (``lambda`` -> ``lambda_``); a nested
    path keeps its name (``partitions.0.density``)."""
    for attr, info in type(op.step).model_fields.items():
        if name in (attr, info.alias):
            return attr
    return name


def _default(op: Op, fs: FieldSchedule) -> Any:
    """The field's value where no filter matches: its default (None: required)."""
    path = fs.path
    model: Any = op.step
    attr = _field_name(op, str(path[0]))
    if len(path) == 3:  # a field of an object in a list (partitions.0.density)
        model, attr = getattr(op.step, attr)[int(path[1])], str(path[2])
    info = type(model).model_fields.get(attr)
    if info is None or info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if fs.per_input and not isinstance(value, list):
        n = len(fs.schedules)
        return [1.0] * n if value is None and path[-1] == "weights" else [value] * n
    return value


def resolve_schedules(steps: StepGraph, active: list[str], plans: Mapping[str, StepPlan]) -> dict[str, StepParams]:
    """Every scheduled field's value for every output tensor of the active steps (``plans``: the
    steps' plans, whose tensors the schedules are resolved over).

    Values that constrain one another (the ascending densities of ``partitions``) are checked
    for each combination a tensor gets.

    Returns:
        step id -> tensor -> python field name (or nested path) -> value; steps without
        schedules are absent.

    Raises:
        RecipeError: a filter list that matches a tensor nowhere on a field without default, or
            scheduled values that together break the step's rules; ``file:line:col`` of the field.
    """
    loaded = steps.loaded
    index = {s.id: i for i, s in enumerate(loaded.recipe.steps)}
    out: dict[str, StepParams] = {}
    problems: list[str] = []
    for sid in active:
        fields = loaded.schedules.get(sid)
        if not fields:
            continue
        op, names = steps.ops[sid], list(plans[sid].metas)
        layers = num_layers_of(names)
        values: StepParams = {tensor: {} for tensor in names}
        for fs in fields.values():
            attr = _field_name(op, fs.field)
            default = _default(op, fs)
            try:
                for tensor in names:
                    values[tensor][attr] = resolve_field(fs, tensor, layers, default)
            except ValueError as exc:
                problems.append(f"{loaded.where(('steps', index[sid], *fs.path))}: step '{sid}': {exc}")
        nested = [fs for fs in fields.values() if len(fs.path) > 1]
        if nested:
            where = loaded.where(("steps", index[sid], *nested[0].path))
            problems += [f"{where}: step '{sid}': {p}" for p in _combination_problems(op, values)]
        out[sid] = values
    if problems:
        raise RecipeError(problems)
    return out


def _combination_problems(op: Op, values: StepParams) -> list[str]:
    """The step validated once per distinct combination of its tensors' values (the first problem only)."""
    from pydantic import ValidationError

    seen: set[str] = set()
    for tensor, vals in values.items():
        key = repr(sorted(vals.items()))
        if key in seen:
            continue
        seen.add(key)
        step = op.with_params(vals).step
        try:
            type(step).model_validate(step.model_dump(by_alias=True))
        except ValidationError as exc:
            msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            return [f"at tensor '{tensor}' the scheduled values break a rule: {msg}"]
    return []


def schedule_rows(op: Op, plan: StepPlan) -> list[str]:
    """The resolved schedule of one step, a line per field and layer group (for ``plan``).

    Tensors of a layer that share a value are shown together: ``layers.3: 0.25 (self_attn x4), 0.75 (x5)``.
    """
    rows: dict[tuple[str, str], dict[str, list[str]]] = {}
    for tensor, values in plan.params.items():
        m = LAYER_INDEX.search("." + tensor)
        where = f"layers.{m.group(1)}" if m else "outside layers"
        for attr, value in values.items():
            shown = _fmt_value(value)
            rows.setdefault((attr, where), {}).setdefault(shown, []).append(tensor)
    lines = []
    for (attr, where), groups in sorted(rows.items(), key=lambda kv: (kv[0][0], _layer_rank(kv[0][1]))):
        parts = [v if len(groups) == 1 else f"{v} ({_short(ts)})" for v, ts in groups.items()]
        lines.append(f"{yaml_name(op, attr)} {where}: {', '.join(parts)}")
    return lines


def _short(tensors: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; at most three, then a count."""
    names = [LAYER_INDEX.split("." + t)[-1].removesuffix(".weight") if LAYER_INDEX.search("." + t) else t
             for t in tensors]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def _layer_rank(where: str) -> int:
    return int(where.split(".")[1]) if where.startswith("layers.") else -1


def yaml_name(op: Op, attr: str) -> str:
    """A field's YAML name (``lambda_`` -> ``lambda``; a nested path as it is)."""
    info = type(op.step).model_fields.get(attr)
    return (info.alias or attr) if info is not None else attr


def _fmt_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return f"{value:.4g}"
