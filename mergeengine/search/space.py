"""The search space: numeric recipe fields addressed by step id and field path, and their ranges.

An address is a step id followed by fields, list indices and keys to any depth, in the recipe's
YAML spelling: ``merged.lambda``, ``merged.weights[1]``, ``a_math.partitions[0].scale``; any
numeric value inside a list- or mapping-valued field is addressed the same way. Applying a point of the
space to a recipe writes each value at its address in a copy of the recipe's YAML data; a field the
recipe leaves at its default is filled in from the validated step first.

No torch here: ``mergeengine validate`` checks the space.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from mergeengine.recipe.loader import LoadedRecipe
from mergeengine.recipe.schema import Recipe, SearchSpec

PathPart = str | int
_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


@dataclass(frozen=True)
class Address:
    """Where a value lives: a step id and the path inside that step (YAML field names, list indices)."""

    step: str
    path: tuple[PathPart, ...]

    def __str__(self) -> str:
        return self.step + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


def parse_address(text: str, step_ids: Sequence[str]) -> Address:
    """Split ``text`` into a step id (the longest one that prefixes it) and a field path.

    Raises:
        ValueError: no step id prefixes it, or the rest is not ``.field`` / ``[index]`` parts.
    """
    for sid in sorted(step_ids, key=len, reverse=True):
        rest = text[len(sid):]
        if text.startswith(sid) and rest[:1] in (".", "["):
            parts: list[PathPart] = []
            pos = 0
            while pos < len(rest):
                m = _PART.match(rest, pos)
                if m is None:
                    raise ValueError(f"cannot read '{rest[pos:]}' (write STEP.FIELD, STEP.FIELD[i], STEP.FIELD[i].KEY)")
                parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
                pos = m.end()
            return Address(sid, tuple(parts))
    head = re.split(r"[.\[]", text, maxsplit=1)[0]
    hint = difflib.get_close_matches(head, list(step_ids), n=1)
    raise ValueError(f"no step '{head}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                     + "; write STEP.FIELD, e.g. merged.lambda")


def get_in(data: Any, path: Sequence[PathPart]) -> Any:
    """The value at ``path`` inside nested dicts and lists.

    Raises:
        ValueError: a field is missing or unset, or an index is out of range (the message says which).
    """
    node = data
    for i, part in enumerate(path):
        where = Address("", tuple(path[: i + 1])).__str__().lstrip(".")
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ValueError(f"'{where}': not a list")
            if part >= len(node):
                raise ValueError(f"'{where}': the list has {len(node)} element(s)")
            node = node[part]
        else:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"'{where}': no such field")
            node = node[part]
        if node is None and i < len(path) - 1:
            raise ValueError(f"'{where}' is not set in the recipe (write it out to tune one of its entries)")
    return node


@dataclass(frozen=True)
class Dimension:
    """One tuned value: its address and its range or choices.

    Attributes:
        name: the address as written (the key of a trial's parameters).
        address: the parsed address.
        low, high: the range (``None`` for choices, and for the DPA factors' open-ended climb).
        choices: the values to pick from.
        step: grid spacing / increment.
        start: where coordinate ascent starts (``None``: the recipe's value).
    """

    name: str
    address: Address
    low: float | None = None
    high: float | None = None
    choices: tuple[float, ...] | None = None
    step: float | None = None
    start: float | None = None

    def grid(self) -> list[float]:
        """Every value a grid search tries.

        Raises:
            ValueError: a range without ``step``.
        """
        if self.choices is not None:
            return list(self.choices)
        if self.step is None or self.low is None or self.high is None:
            raise ValueError(f"search: '{self.name}': a grid over a range needs 'step'")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 10) for i in range(n + 1)]

    def from_unit(self, u: float) -> float:
        """Map ``u`` in [0, 1] onto the range (snapped to ``step``) or onto the nearest choice."""
        u = min(1.0, max(0.0, float(u)))
        if self.choices is not None:
            return self.choices[min(len(self.choices) - 1, int(u * len(self.choices)))]
        assert self.low is not None and self.high is not None
        value = self.low + u * (self.high - self.low)
        if self.step is not None:
            value = self.low + round((value - self.low) / self.step) * self.step
        return round(min(self.high, max(self.low, value)), 10)

    def to_unit(self, value: float) -> float:
        """The inverse of :meth:`from_unit` (a choice maps to the middle of its slot)."""
        if self.choices is not None:
            idx = min(range(len(self.choices)), key=lambda i: abs(self.choices[i] - value))  # type: ignore[index]
            return (idx + 0.5) / len(self.choices)
        assert self.low is not None and self.high is not None
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))


def _step_ids(raw: Mapping[str, Any]) -> list[str]:
    return [s["id"] for s in raw.get("steps", []) if isinstance(s, dict) and isinstance(s.get("id"), str)]


def dimensions(loaded: LoadedRecipe) -> list[Dimension]:
    """The search space of a recipe's ``search`` block (``factors`` become ``STEP.partitions[i].scale``).

    The recipe must have been validated (``mergeengine.api.validate``).
    """
    spec = loaded.recipe.search
    assert spec is not None
    ids = _step_ids(loaded.raw)
    if spec.factors:
        return [Dimension(f"{f.step}.partitions[{f.partition}].scale",
                          Address(f.step, ("partitions", f.partition, "scale")),
                          step=spec.step_size, start=f.start) for f in spec.factors]
    out = []
    for p in spec.space:
        low, high = p.bounds if p.bounds is not None else (None, None)
        out.append(Dimension(p.param, parse_address(p.param, ids), low, high,
                             tuple(p.choices) if p.choices is not None else None, p.step, p.start))
    return out


def current_values(loaded: LoadedRecipe, dims: Sequence[Dimension]) -> dict[str, float]:
    """Each dimension's value in the recipe as written (defaults filled in)."""
    steps = {s.id: s for s in loaded.recipe.steps}
    return {d.name: float(get_in(_dump(steps[d.address.step]), d.address.path)) for d in dims}


def _dump(step: BaseModel) -> dict[str, Any]:
    return step.model_dump(by_alias=True, mode="json")


def apply_point(loaded: LoadedRecipe, dims: Sequence[Dimension], point: Mapping[str, float]) -> dict[str, Any]:
    """A copy of the recipe's YAML data with ``point``'s values written in and no ``search`` block."""
    raw = copy.deepcopy(loaded.raw)
    raw.pop("search", None)
    models = {s.id: s for s in loaded.recipe.steps}
    by_id = {s["id"]: s for s in raw["steps"]}
    for d in dims:
        _set_in(by_id[d.address.step], d.address.path, point[d.name], _dump(models[d.address.step]))
    return raw


def _set_in(node: dict[str, Any], path: Sequence[PathPart], value: float, defaults: Any) -> None:
    """Write ``value`` at ``path``; containers the recipe left out are copied from ``defaults`` first."""
    for i, part in enumerate(path):
        defaults = defaults[part]
        last = i == len(path) - 1
        if last:
            node[part] = _plain(value)
        else:
            if isinstance(part, str) and part not in node:
                node[part] = copy.deepcopy(defaults)
            node = node[part]


def _plain(value: float) -> float | int:
    """Integral values as ints (so integer fields validate), others rounded to 10 digits for YAML."""
    return int(value) if float(value).is_integer() else round(float(value), 10)


def check_space(loaded: LoadedRecipe, ops: Mapping[str, Any]) -> list[str]:
    """Problems of the ``search`` block's space, one ``file:line:col`` line each.

    Checks that each address names a step and a numeric field of it, that grid ranges have a step,
    and that the recipe still validates at each end of every range (and at every choice).
    """
    spec = loaded.recipe.search
    if spec is None or not spec.space:
        return []
    problems: list[str] = []
    ids = list(ops)
    models = {s.id: s for s in loaded.recipe.steps}
    for i, p in enumerate(spec.space):
        where = loaded.where(("search", "space", i, "param"))
        try:
            addr = parse_address(p.param, ids)
            value = get_in(_dump(models[addr.step]), addr.path)
        except ValueError as exc:
            problems.append(f"{where}: search: param '{p.param}': {exc}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: search: param '{p.param}' is not a number in step '{addr.step}' "
                            f"(it is {value!r})")
            continue
        problems += _check_values(loaded, spec, i, p.param, addr)
    return problems


def check_references(loaded: LoadedRecipe, ops: Mapping[str, Any]) -> list[str]:
    """A reference given as a step id must name a load step (the dense expert evaluated for it)."""
    spec = loaded.recipe.search
    if spec is None:
        return []
    problems = []
    for task, ref in spec.references.items():
        if isinstance(ref, str) and (ref not in ops or ops[ref].name != "load"):
            problems.append(f"{loaded.where(('search', 'references', task))}: search: the reference of task "
                            f"'{task}' names '{ref}', which is not a load step (the dense expert to evaluate)")
        elif not isinstance(ref, str) and ref <= 0:
            problems.append(f"{loaded.where(('search', 'references', task))}: search: the reference of task "
                            f"'{task}' must be above 0, got {ref}")
    return problems


def _check_values(loaded: LoadedRecipe, spec: SearchSpec, i: int, name: str, addr: Address) -> list[str]:
    p = spec.space[i]
    if spec.strategy == "grid" and p.choices is None and p.step is None:
        return [f"{loaded.where(('search', 'space', i))}: search: param '{name}': a grid over a range needs 'step'"]
    dim = Dimension(name, addr)
    values = list(p.choices) if p.choices is not None else list(p.bounds or ())
    for v in values:
        raw = apply_point(loaded, [dim], {name: v})
        try:
            Recipe.model_validate(raw)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            key = "choices" if p.choices is not None else "range"
            return [f"{loaded.where(('search', 'space', i, key))}: search: param '{name}' = {v:g} "
                    f"is not valid in step '{addr.step}': {msg}"]
    return []
