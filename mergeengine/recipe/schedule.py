"""Parameter schedules: a step's numeric parameter that varies with the tensor (mergekit's gradients and filters).

A numeric step field may be written as

- a number: the same value for every tensor;
- a list of numbers (on a field that takes one number): a *gradient* over layer depth, by
  mergekit's rule: the anchors spread evenly from the first layer (t = 0) to the last (t = 1) and
  a layer at ``t`` takes the linear interpolation of its two neighbouring anchors
  (``t = layer / (num_layers - 1)``); tensors outside the decoder layers take ``t = 0``, the first
  value, as mergekit's embeddings, final norm and lm_head do;
- a list of ``{filter: PATTERN, value: NUMBER | GRADIENT}``: the first entry whose filter matches
  the tensor name wins (a substring, or a glob when the pattern has ``*?[``; an entry without
  ``filter`` matches every tensor). When nothing matches, the field's default applies.

On a per-input field (``weights``, ``density`` of a merge), a list of numbers keeps its meaning
(one value per input) and each element may itself be a schedule::

    density: [[0.2, 0.5, 0.8], 0.3]               # input 0: a gradient, input 1: constant
    t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]

A field that holds a list of objects (``dpa_amplify``'s ``partitions``) takes schedules in the
objects' numeric fields; such a schedule is named by its path, ``partitions.0.density``::

    partitions: [{density: [0.1, 0.2], scale: 1.8}, {density: [0.2, 0.4], scale: 1.0}]

The loader (:func:`split_schedules`) takes the schedules out of the raw recipe before it is
validated, validates the step once per anchor value (so each value meets the field's own bounds,
before any weight is read), and hands them on in :class:`StepSchedules`. The planner resolves
them for every output tensor (:func:`resolve_field`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Gradient:
    """Anchors spread evenly over layer depth (at least two)."""

    anchors: tuple[float, ...]

    def at(self, t: float) -> float:
        """mergekit's interpolation at depth ``t`` in [0, 1]."""
        scaled = t * (len(self.anchors) - 1)
        i0 = int(scaled)
        i1 = min(len(self.anchors) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.anchors[i0] + frac * self.anchors[i1]


Value = Union[float, Gradient]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class Filtered:
    """``(filter or None, value)`` entries; the first match wins."""

    entries: tuple[tuple[str | None, Value], ...]


Schedule = Union[float, Gradient, Filtered]  # noqa: UP007


@dataclass(frozen=True)
class FieldSchedule:
    """One scheduled field: a single schedule, or one per input (``per_input``).

    ``field`` is the field's YAML name, or the dotted path of a field inside a list of objects
    (``partitions.0.density``).
    """

    field: str
    schedules: tuple[Schedule, ...]
    per_input: bool

    @property
    def path(self) -> tuple[str | int, ...]:
        """The field's YAML path inside its step: ``("density",)``, ``("partitions", 0, "density")``."""
        return field_path(self.field)


def field_path(name: str) -> tuple[str | int, ...]:
    """``"partitions.0.density"`` -> ``("partitions", 0, "density")``."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


StepSchedules = dict[str, FieldSchedule]  # field name -> its schedule


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_gradient(x: Any) -> bool:
    return isinstance(x, list) and len(x) >= 2 and all(_is_number(e) for e in x)


def _is_filter_list(x: Any) -> bool:
    return (isinstance(x, list) and len(x) >= 1 and all(
        isinstance(e, dict) and "value" in e and set(e) <= {"filter", "value"} for e in x))


def parse_schedule(raw: Any) -> Schedule | None:
    """A raw YAML value as a schedule; None when it is not one (left to the field's own validation)."""
    if _is_number(raw):
        return float(raw)
    if _is_gradient(raw):
        return Gradient(tuple(float(e) for e in raw))
    if _is_filter_list(raw):
        entries = []
        for e in raw:
            value = e["value"]
            if not (_is_number(value) or _is_gradient(value)):
                return None
            pattern = e.get("filter")
            entries.append((None if pattern in (None, "*") else str(pattern),
                            float(value) if _is_number(value) else Gradient(tuple(float(v) for v in value))))
        return Filtered(tuple(entries))
    return None


def anchors(schedule: Schedule) -> list[float]:
    """Every number a schedule can yield at its anchors (validated against the field's bounds)."""
    if isinstance(schedule, float):
        return [schedule]
    if isinstance(schedule, Gradient):
        return list(schedule.anchors)
    out: list[float] = []
    for _, value in schedule.entries:
        out += anchors(value)
    return out


def field_schedule(name: str, raw: Any, accepts: Callable[[Any], bool]) -> FieldSchedule | None:
    """The schedule a raw field value describes, or None when the value means what it always did.

    Args:
        name: the field.
        raw: its YAML value.
        accepts: whether the step validates with this value for the field (decides whether a
            list of numbers is a per-input list, which stays, or a gradient).
    """
    if not isinstance(raw, list) or accepts(raw):
        return None
    whole = parse_schedule(raw)
    if whole is not None and accepts(anchors(whole)[0]):  # a field of one number: gradient or filter list
        return FieldSchedule(name, (whole,), per_input=False)
    parts = [parse_schedule(e) for e in raw]
    if parts and all(p is not None for p in parts):
        return FieldSchedule(name, tuple(p for p in parts if p is not None), per_input=True)
    return None


def probe(fs: FieldSchedule, k: int) -> Any:
    """The field value of validation probe ``k``: each schedule's ``k``-th anchor (its last when fewer)."""
    vals = [anchors(s)[min(k, len(anchors(s)) - 1)] for s in fs.schedules]
    return vals if fs.per_input else vals[0]


def probe_count(fs: FieldSchedule) -> int:
    """How many probes check every anchor of ``fs``."""
    return max(len(anchors(s)) for s in fs.schedules)


def layer_depth(tensor: str, num_layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``layer / (num_layers - 1)`` in the decoder layers (1 for a
    single layer), 0 outside them."""
    m = LAYER_INDEX.search("." + tensor)
    if m is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(m.group(1)) / (num_layers - 1)


def num_layers_of(names: list[str]) -> int:
    """Decoder layers in a set of tensor names (highest ``layers.N`` index + 1; 0 when none)."""
    found = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search("." + n))]
    return max(found) + 1 if found else 0


def matches(pattern: str | None, tensor: str) -> bool:
    """A filter: None matches all; a glob (``*?[``) matches the whole name; else a substring."""
    if pattern is None:
        return True
    if _GLOB.search(pattern):
        return fnmatch.fnmatchcase(tensor, pattern)
    return pattern in tensor


def resolve(schedule: Schedule, tensor: str, t: float) -> float | None:
    """The schedule's value for ``tensor`` at depth ``t``; None when no filter matches."""
    if isinstance(schedule, float):
        return schedule
    if isinstance(schedule, Gradient):
        return schedule.at(t)
    for pattern, value in schedule.entries:
        if matches(pattern, tensor):
            return value if isinstance(value, float) else value.at(t)
    return None


def resolve_field(fs: FieldSchedule, tensor: str, num_layers: int, default: Any) -> Any:
    """A scheduled field's value for one tensor (a list for per-input fields).

    Args:
        fs: the field's schedule.
        tensor: the output tensor's name.
        num_layers: decoder layers of the step's output.
        default: the field's default (or its per-input element), used where no filter matches.

    Raises:
        ValueError: no filter matches and the field has no default.
    """
    t = layer_depth(tensor, num_layers)
    vals = []
    for i, s in enumerate(fs.schedules):
        v = resolve(s, tensor, t)
        if v is None:
            d = default[i] if isinstance(default, list) else default
            if d is None:
                what = f"input {i} of '{fs.field}'" if fs.per_input else f"'{fs.field}'"
                raise ValueError(f"no filter of {what} matches tensor '{tensor}' and the field has no default "
                                 "(add an entry without 'filter')")
            v = d
        vals.append(v)
    return vals if fs.per_input else vals[0]


def split_schedules(
    steps: list[Any], accepts: Callable[[dict[str, Any], tuple[str | int, ...], Any], bool]
) -> tuple[dict[int, StepSchedules], int]:
    """Find the schedules in a raw recipe's steps.

    Args:
        steps: the raw ``steps`` list.
        accepts: (raw step, field path, value) -> whether the step validates with that value there.

    Returns:
        (step index -> its scheduled fields, number of validation probes needed).
    """
    found: dict[int, StepSchedules] = {}
    probes = 1
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        for path, raw in _candidates(step):
            fs = field_schedule(".".join(map(str, path)), raw, lambda v, s=step, p=path: accepts(s, p, v))
            if fs is not None:
                found.setdefault(i, {})[fs.field] = fs
                probes = max(probes, probe_count(fs))
    return found, probes


def _candidates(step: dict[str, Any]) -> list[tuple[tuple[str | int, ...], Any]]:
    """The lists a raw step holds that may be schedules: its fields', and those of the objects in a
    list-of-objects field (``partitions``), each with its path."""
    out: list[tuple[tuple[str | int, ...], Any]] = []
    for name, raw in step.items():
        if name in ("id", "op", "method") or not isinstance(raw, list):
            continue
        if raw and all(isinstance(e, dict) and "value" not in e for e in raw):
            out += [((name, j, key), sub) for j, e in enumerate(raw) for key, sub in e.items() if isinstance(sub, list)]
        else:
            out.append(((name,), raw))
    return out


def set_at(step: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of a raw step with ``value`` at ``path`` (copying the lists and objects on the way)."""
    if len(path) == 1:
        return {**step, path[0]: value}
    name, j, key = path
    items = list(step[name])
    items[j] = {**items[j], key: value}
    return {**step, name: items}


def probe_steps(steps: list[Any], found: dict[int, StepSchedules], k: int) -> list[Any]:
    """The raw steps with every scheduled field replaced by probe ``k``'s values."""
    out = list(steps)
    for i, fields in found.items():
        step = steps[i]
        for fs in fields.values():
            step = set_at(step, fs.path, probe(fs, k))
        out[i] = step
    return out


def field_accepts(step: dict[str, Any], path: tuple[str | int, ...], value: Any) -> bool:
    """Whether the step validates with ``value`` at field ``path`` (other fields' problems aside)."""
    from pydantic import TypeAdapter, ValidationError

    from mergeengine.recipe.schema import AnyStep

    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(AnyStep)
    try:
        _ADAPTER.validate_python(set_at(step, path, value))
    except ValidationError as exc:
        return not any(_within(err["loc"], path) for err in exc.errors())
    return True


def _within(loc: tuple[Any, ...], path: tuple[str | int, ...]) -> bool:
    """Whether an error location lies at or under ``path`` (the union's tag may precede it)."""
    n = len(path)
    return any(tuple(loc[i:i + n]) == path for i in range(len(loc) - n + 1))


_ADAPTER: Any = None


#: Validation context key: ids of the steps whose probes pair values no tensor gets together.
UNPAIRED_STEPS = "unpaired_steps"


def unpaired_steps(steps: list[Any], found: dict[int, StepSchedules]) -> frozenset[str]:
    """The steps where a probe pairs the k-th anchors of list-entry fields (``partitions.0.density``,
    ``partitions.1.density``) of which one comes from a filter: the other entry's k-th anchor may
    belong to another filter, a combination no tensor gets. Rules between a list's entries are
    checked for those steps per tensor when the plan resolves the schedules, not on the probes."""
    out = set()
    for i, fields in found.items():
        if any(len(fs.path) > 1 and _has_filter(s) for fs in fields.values() for s in fs.schedules):
            out.add(str(steps[i].get("id")))
    return frozenset(out)


def _has_filter(schedule: Schedule) -> bool:
    return isinstance(schedule, Filtered) and any(pattern is not None for pattern, _ in schedule.entries)


def checks_entry_rules(context: Any, step_id: Any) -> bool:
    """For a validator of a rule between a list's entries: whether to check it (False on the
    probes of an :func:`unpaired_steps` step, whose combinations are not real)."""
    return not (isinstance(context, dict) and step_id in context.get(UNPAIRED_STEPS, ()))


def schedule_probes(data: dict[str, Any]) -> tuple[dict[int, StepSchedules], list[dict[str, Any]]]:
    """The schedules of a raw recipe and the recipe data to validate (one probe per anchor position).

    Returns:
        (step index -> scheduled fields, probes): the first probe is the recipe that runs (each
        scheduled field at its first anchor); together the probes check every anchor value.
    """
    steps = data.get("steps")
    if not isinstance(steps, list):
        return {}, [data]
    found, count = split_schedules(steps, field_accepts)
    if not found:
        return {}, [data]
    return found, [{**data, "steps": probe_steps(steps, found, k)} for k in range(count)]
