"""Per-tensor parameters: the recipe's schedules resolved for every output tensor of a step.

The planner calls :func:`resolve_schedules` once headers are known (so a filter that matches
nothing, on a field without default, fails before any weight is read); the executor hands each
task the op with its values (:meth:`mergeengine.ops.base.Op.with_params`).
"""

from __future__ import annotations

from typing import Any

from mergeengine.errors import RecipeError
from mergeengine.graph.steps import StepGraph
from mergeengine.ops.base import Op, StepPlan
from mergeengine.recipe.schedule import LAYER_INDEX, FieldSchedule, num_layers_of, resolve_field

TensorParams = dict[tuple[str, str], dict[str, Any]]  # (step, tensor) -> python field name -> value


def _field_name(op: Op, name: str) -> str:
    """The step model's attribute for a YAML field name (``lambda`` -> ``lambda_``)."""
    for attr, info in type(op.step).model_fields.items():
        if name in (attr, info.alias):
            return attr
    return name


def _default(op: Op, attr: str, fs: FieldSchedule) -> Any:
    info = type(op.step).model_fields[attr]
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if fs.per_input and not isinstance(value, list):
        n = len(fs.schedules)
        return [1.0] * n if value is None and attr == "weights" else [value] * n
    return value


def resolve_schedules(steps: StepGraph, active: list[str], plans: dict[str, StepPlan]) -> TensorParams:
    """Every scheduled field's value for every output tensor of the active steps (``plans``: the
    steps' plans, whose tensors the schedules are resolved over).

    Raises:
        RecipeError: a schedule on a step with whole-model statistics, or a filter list that
            matches a tensor nowhere on a field without default; ``file:line:col`` of the field.
    """
    loaded = steps.loaded
    index = {s.id: i for i, s in enumerate(loaded.recipe.steps)}
    out: TensorParams = {}
    problems: list[str] = []
    for sid in active:
        fields = loaded.schedules.get(sid)
        if not fields:
            continue
        op = steps.ops[sid]
        if op.reductions(plans[sid]):
            name = next(iter(fields))
            problems.append(f"{loaded.where(('steps', index[sid], name))}: step '{sid}': '{name}' cannot vary per "
                            f"tensor on a step with whole-model statistics ({op.name}); give one value")
            continue
        names = list(plans[sid].metas)
        layers = num_layers_of(names)
        for name, fs in fields.items():
            attr = _field_name(op, name)
            default = _default(op, attr, fs)
            try:
                for tensor in names:
                    out.setdefault((sid, tensor), {})[attr] = resolve_field(fs, tensor, layers, default)
            except ValueError as exc:
                problems.append(f"{loaded.where(('steps', index[sid], name))}: step '{sid}': {exc}")
    if problems:
        raise RecipeError(problems)
    return out


def schedule_rows(op: Op, params: TensorParams, sid: str) -> list[str]:
    """The resolved schedule of one step, a line per field and layer group (for ``plan``).

    Tensors of a layer that share a value are shown together: ``layers.3: 0.25 (self_attn x4), 0.75 (x5)``.
    """
    rows: dict[tuple[str, str], dict[str, list[str]]] = {}
    for (step, tensor), values in params.items():
        if step != sid:
            continue
        m = LAYER_INDEX.search("." + tensor)
        where = f"layers.{m.group(1)}" if m else "outside layers"
        for attr, value in values.items():
            shown = _fmt_value(value)
            rows.setdefault((attr, where), {}).setdefault(shown, []).append(tensor)
    lines = []
    for (attr, where), groups in sorted(rows.items(), key=lambda kv: (kv[0][0], _layer_rank(kv[0][1]))):
        parts = [v if len(groups) == 1 else f"{v} ({_short(ts)})" for v, ts in groups.items()]
        lines.append(f"{_yaml_name(op, attr)} {where}: {', '.join(parts)}")
    return lines


def _short(tensors: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; at most three, then a count."""
    names = [LAYER_INDEX.split("." + t)[-1].removesuffix(".weight") if LAYER_INDEX.search("." + t) else t
             for t in tensors]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def _layer_rank(where: str) -> int:
    return int(where.split(".")[1]) if where.startswith("layers.") else -1


def _yaml_name(op: Op, attr: str) -> str:
    return type(op.step).model_fields[attr].alias or attr


def _fmt_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return f"{value:.4g}"
