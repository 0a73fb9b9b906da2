"""Load a recipe from YAML, keeping line:column of every key so errors can point at them."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergeengine.errors import RecipeError
from mergeengine.methods import METHODS
from mergeengine.ops import OPS
from mergeengine.recipe.mergekit_schema import is_mergekit_config
from mergeengine.recipe.schedule import StepSchedules, schedule_probes
from mergeengine.recipe.schema import Recipe, step_fields


@dataclass
class Positions:
    """Line:column (1-based) of YAML nodes, addressed by a path such as ``("steps", 3, "lambda")``."""

    root: yaml.Node | None

    def of(self, path: tuple[Any, ...], *, key: bool = False) -> tuple[int, int]:
        """Position of the deepest node along ``path`` (the key itself when ``key`` is set)."""
        node = self.root
        best = (1, 1)
        if node is None:
            return best
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == part:
                        target = k if (last and key) else v
                        best = (target.start_mark.line + 1, target.start_mark.column + 1)
                        node = v
                        break
                # a path element that is no key here (a union tag) is skipped
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                best = (node.start_mark.line + 1, node.start_mark.column + 1)
        return best


@dataclass
class LoadedRecipe:
    """A validated recipe with where it came from.

    Attributes:
        recipe: the validated recipe.
        path: the YAML file (``<string>`` for text).
        positions: line:column lookup for messages.
        raw: the parsed YAML data (for provenance).
        schedules: step id -> its per-tensor parameter schedules (see :mod:`mergeengine.recipe.schedule`).
    """

    recipe: Recipe
    path: str
    positions: Positions
    raw: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    schedules: dict[str, StepSchedules] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        """Folder that relative model paths are resolved against."""
        return Path(self.path).resolve().parent if self.path != "<string>" else Path.cwd()

    def where(self, path: tuple[Any, ...], *, key: bool = False) -> str:
        """``file:line:col`` for a YAML path."""
        line, col = self.positions.of(path, key=key)
        return f"{self.path}:{line}:{col}"


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file (syntax and schema; references are checked by the step graph).

    Raises:
        RecipeError: one line per problem, each with ``file:line:col``.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RecipeError([f"{p}: recipe file not found"]) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{p}: cannot read recipe: {exc}"]) from None
    return parse_recipe(text, str(p))


def parse_recipe(text: str, path: str = "<string>") -> LoadedRecipe:
    """Validate recipe text. See :func:`load_recipe`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{where}: invalid YAML: {problem}"]) from None
    positions = Positions(root)
    if not isinstance(data, dict):
        raise RecipeError([f"{path}:1:1: a recipe is a mapping with a 'steps' list, got {type(data).__name__}"])
    if is_mergekit_config(data):  # a mergekit config runs as the recipe it converts to
        from mergeengine.recipe.mergekit import mergekit_recipe

        return mergekit_recipe(data, positions, path)
    return validate_data(data, positions, path, text)


def validate_data(data: dict[str, Any], positions: Positions, path: str, text: str = "") -> LoadedRecipe:
    """Validate parsed recipe data; ``positions`` place errors in the file at ``path``.

    Raises:
        RecipeError: one line per problem, each with ``file:line:col``.
    """
    found, probes = schedule_probes(data)  # per-tensor schedules (gradients, filters) out of the fields
    try:
        recipe = Recipe.model_validate(probes[0])
        for extra in probes[1:]:  # each anchor value meets its field's bounds
            Recipe.model_validate(extra)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, data, positions, path)) from None
    schedules = {recipe.steps[i].id: fields for i, fields in found.items()}
    return LoadedRecipe(recipe, path, positions, data, text, schedules)


def _format_errors(exc: ValidationError, data: dict[str, Any], positions: Positions, path: str) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        kind = err["type"]
        prefix = ""
        step: dict[str, Any] = {}
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            steps = data.get("steps") or []
            step = steps[loc[1]] if loc[1] < len(steps) and isinstance(steps[loc[1]], dict) else {}
            sid = step.get("id")
            prefix = f"step '{sid}': " if sid else f"step #{loc[1] + 1}: "
        field_name = next((p for p in reversed(loc) if isinstance(p, str) and p not in _TAGS and not _BRANCH.search(p)),
                          None)
        if kind == "extra_forbidden":
            allowed = step_fields(step) if step else list(Recipe.model_fields)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown field '{loc[-1]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if allowed:
                msg += f"; allowed: {', '.join(a for a in allowed if a not in ('id', 'op'))}"
            where = positions.of(loc, key=True)
        elif kind == "union_tag_invalid":
            tag = err["ctx"]["discriminator"].strip("'")
            value = err["ctx"]["tag"]
            choices = sorted(OPS) if tag == "op" else sorted(METHODS)
            hint = difflib.get_close_matches(str(value), choices, n=1)
            what = "op" if tag == "op" else "merge method"
            msg = f"unknown {what} '{value}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            msg += f". Available: {', '.join(choices)}"
            where = positions.of((*loc, tag))
        elif kind == "union_tag_not_found":
            tag = err["ctx"]["discriminator"].strip("'")
            msg = f"missing field '{tag}'"
            where = positions.of(loc)
        elif kind == "missing":
            msg = f"missing required field '{loc[-1]}'"
            where = positions.of(loc[:-1])
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"field '{field_name}': {text}" if field_name and field_name != "steps" else text
            where = positions.of(loc)
        line = f"{path}:{where[0]}:{where[1]}: {prefix}{msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


_TAGS = {*OPS, *METHODS}
# pydantic's names of union branches in error locations ("constrained-float", "list[float]")
_BRANCH = re.compile(r"[\[\-]|^(float|int|str|bool|none)$")
