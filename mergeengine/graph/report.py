"""Render a plan as text, JSON or Graphviz DOT (``mergeengine plan --format``)."""

from __future__ import annotations

import json
from typing import Any

from mergeengine.graph.params import schedule_rows
from mergeengine.graph.plan import Plan, TaskKey


def _fmt(n: float) -> str:
    from mergeengine.api import fmt_bytes

    return fmt_bytes(n)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain data."""
    est = plan.estimate
    steps = []
    for sid in plan.active:
        op = plan.ops[sid]
        kind = plan.steps.kinds[sid]
        metas = plan.metas[sid]
        steps.append(
            {
                "id": sid,
                "op": op.name,
                "method": op.label if op.label != op.name else None,
                "kind": kind.kind,
                "uses": [r for refs in op.references().values() for r in refs],
                "tensors": len(metas),
                "bytes": sum(m.nbytes for m in metas.values()),
                "params": op.describe(),
                "notes": op.plan_notes(plan.step_plans[sid]),
                "schedule": schedule_rows(op, plan.step_plans[sid]),
            }
        )
    unused = [s for s in plan.ops if s not in plan.active]
    return {
        "recipe": plan.steps.loaded.recipe.name,
        "file": plan.steps.loaded.path,
        "steps": steps,
        "unused_steps": unused,
        "passes": plan.phase_labels(),
        "tasks": len(plan.order),
        "tensors_written": est.tensors_written,
        "bytes_read": est.bytes_read,
        "bytes_read_unique": est.bytes_read_unique,
        "bytes_written": est.bytes_written,
        "peak_live_bytes": est.peak_live_bytes,
        "largest_tensor_bytes": est.largest_tensor_bytes,
        "outputs": {s: str(p) for s, p in plan.save_paths.items() if s in plan.save_order},
    }


def plan_json(plan: Plan) -> str:
    """JSON rendering of :func:`plan_dict`."""
    return json.dumps(plan_dict(plan), indent=2)


def plan_text(plan: Plan) -> str:
    """Human-readable plan."""
    d = plan_dict(plan)
    lines = [f"recipe '{d['recipe']}' ({d['file']})", "steps:"]
    width = max(len(s["id"]) for s in d["steps"])
    for s in d["steps"]:
        op = s["op"] + (f":{s['method']}" if s["method"] else "")
        uses = ", ".join(s["uses"]) or s["params"].get("model", "")
        lines.append(f"  {s['id']:<{width}}  {op:<22} {s['kind']:<5}  {s['tensors']:>5} tensors  "
                     f"{_fmt(s['bytes']):>10}  <- {uses}")
        lines.extend(f"      {n}" for n in s["notes"])
        lines.extend(f"      schedule: {row}" for row in s["schedule"])
    if d["unused_steps"]:
        lines.append(f"unused steps (not needed by any save): {', '.join(d['unused_steps'])}")
    lines.append(f"passes: {len(d['passes'])} ({'; '.join(d['passes'])})")
    lines.append(f"tasks: {d['tasks']}; tensors written: {d['tensors_written']}")
    lines.append(f"bytes to read: {_fmt(d['bytes_read'])} (inputs hold {_fmt(d['bytes_read_unique'])}); "
                 f"bytes to write: {_fmt(d['bytes_written'])}")
    lines.append(f"estimated peak live memory: {_fmt(d['peak_live_bytes'])} "
                 f"(largest tensor {_fmt(d['largest_tensor_bytes'])})")
    for s, p in d["outputs"].items():
        lines.append(f"output '{s}': {p}")
    return "\n".join(lines)


def plan_dot(plan: Plan) -> str:
    """The step DAG in Graphviz DOT."""
    lines = ["digraph recipe {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    for sid in plan.active:
        op = plan.ops[sid]
        label = f"{sid}\\n{op.name}" + (f":{op.label}" if op.label != op.name else "")
        shape = "ellipse" if plan.steps.kinds[sid].kind == "delta" else "box"
        lines.append(f'  "{sid}" [label="{label}", shape={shape}];')
    for a, b in plan.steps.edges:
        if a in plan.active and b in plan.active:
            lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines)


def explain_text(plan: Plan, tensor: str) -> str:
    """Every active step's parameters as they apply to one tensor (``mergeengine plan --explain``).

    Raises:
        MergeEngineError: no step produces ``tensor``.
    """
    from mergeengine.errors import MergeEngineError

    lines = [f"tensor '{tensor}':"]
    for sid in plan.active:
        if tensor not in plan.metas[sid]:
            continue
        op = plan.op_for(TaskKey(sid, tensor))
        params = {k: v for k, v in op.describe().items() if k not in ("id", "op")}
        scheduled = {k.split(".")[0] for k in plan.step_plans[sid].params.get(tensor, {})}
        shown = ", ".join(f"{k}={v}" + (" (scheduled)" if _attr(op, k) in scheduled else "")
                          for k, v in params.items() if v is not None)
        lines.append(f"  {sid} ({op.name}): {shown}")
        lines.extend(f"      {n}" for n in op.explain(plan.step_plans[sid], tensor))
    if len(lines) == 1:
        known = sorted({n for m in plan.metas.values() for n in m})
        raise MergeEngineError(f"no step produces tensor '{tensor}' (e.g. {', '.join(known[:3])})")
    return "\n".join(lines)


def _attr(op: object, yaml_name: str) -> str:
    fields = type(op.step).model_fields  # type: ignore[attr-defined]
    return next((a for a, f in fields.items() if yaml_name in (a, f.alias)), yaml_name)
