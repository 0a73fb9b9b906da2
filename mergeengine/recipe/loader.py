"""Load a recipe from YAML, keeping line:column of every key so errors can point at them.

Recipes are shared, so the YAML is read strictly: a key given twice is an error naming both lines
(YAML would keep the last one silently, and a reviewer reads the first); anchors used as aliases
and merge keys (``<<``) are refused, so a few lines cannot expand to gigabytes; nesting deeper than
:data:`MAX_DEPTH` is refused. The text is parsed once (libyaml when present): the node tree gives
both the data and the positions.
"""

from __future__ import annotations

import difflib
import os
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
from mergeengine.recipe.schedule import UNPAIRED_STEPS, StepSchedules, schedule_probes, unpaired_steps
from mergeengine.recipe.schema import Recipe, out_of_range_numbers, recipe_model, step_fields


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


#: Deepest nesting of mappings and lists a recipe may have (real recipes use 4-5 levels).
MAX_DEPTH = 64
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _node_problems(root: yaml.Node, path: str) -> list[str]:
    """Duplicate keys, aliases, merge keys and excessive nesting in a composed YAML tree (walked iteratively)."""
    problems: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        if id(node) in seen:
            problems.append(f"{path}:{line}:{col}: YAML aliases are not allowed in recipes (this anchored value "
                            "is used again): write the value out")
            continue
        seen.add(id(node))
        if depth > MAX_DEPTH and not isinstance(node, yaml.ScalarNode):
            problems.append(f"{path}:{line}:{col}: nested more than {MAX_DEPTH} levels deep")
            continue
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            problems.extend(_key_problems(node, path))
            for k, v in reversed(node.value):
                stack.extend(((v, depth + 1), (k, depth + 1)))
    return problems


def _key_problems(node: yaml.MappingNode, path: str) -> list[str]:
    first: dict[tuple[str, str], yaml.Node] = {}
    problems = []
    for k, _ in node.value:
        if k.tag == _MERGE_TAG:
            problems.append(f"{path}:{k.start_mark.line + 1}:{k.start_mark.column + 1}: YAML merge keys (<<) "
                            "are not allowed in recipes: write the keys out")
        if not isinstance(k, yaml.ScalarNode):
            continue
        earlier = first.setdefault((k.tag, k.value), k)
        if earlier is not k:
            problems.append(f"{path}:{k.start_mark.line + 1}:{k.start_mark.column + 1}: duplicate key '{k.value}' "
                            f"(first at line {earlier.start_mark.line + 1}): remove one; YAML would silently keep "
                            "the last")
    return problems


def _parse_yaml(text: str, path: str) -> tuple[yaml.Node | None, Any]:
    """Compose the YAML once, check it (see the module docstring), and build the data from the same tree."""
    loader = _LOADER(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        problems = _node_problems(root, path)
        if problems:
            raise RecipeError(problems)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


def parse_recipe(text: str, path: str = "<string>") -> LoadedRecipe:
    """Validate recipe text. See :func:`load_recipe`."""
    try:
        root, data = _parse_yaml(text, path)
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
    context = {UNPAIRED_STEPS: unpaired_steps(data.get("steps") or [], found)}
    try:
        model = recipe_model()
        # each anchor value meets its field's bounds
        recipes = [model.model_validate(p, context=context) for p in probes]
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, data, positions, path)) from None
    recipe = recipes[0]
    problems = [_located(path, positions, data, loc, msg) for r in recipes for loc, msg in out_of_range_numbers(r)]
    problems = list(dict.fromkeys(problems)) + _save_path_problems(recipe, positions, path)
    if problems:
        raise RecipeError(problems)
    schedules = {recipe.steps[i].id: fields for i, fields in found.items()}
    return LoadedRecipe(recipe, path, positions, data, text, schedules)


def _step_prefix(data: dict[str, Any], loc: tuple[Any, ...]) -> str:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = data.get("steps") or []
        step = steps[loc[1]] if loc[1] < len(steps) and isinstance(steps[loc[1]], dict) else {}
        sid = step.get("id")
        return f"step '{sid}': " if sid else f"step #{loc[1] + 1}: "
    return ""


def _located(path: str, positions: Positions, data: dict[str, Any], loc: tuple[Any, ...], msg: str) -> str:
    field_name = next((p for p in reversed(loc) if isinstance(p, str)), "")
    line, col = positions.of(loc)
    return f"{path}:{line}:{col}: {_step_prefix(data, loc)}field '{field_name}': {msg}"


def _save_path_problems(recipe: Recipe, positions: Positions, path: str) -> list[str]:
    """Two save steps writing the same or nested folders (paths as written, relative to the recipe)."""
    base = Path(path).resolve().parent if path != "<string>" else Path.cwd()
    seen: list[tuple[Path, str, int]] = []
    problems = []
    for i, step in enumerate(recipe.steps):
        p = getattr(step, "path", None) if step.op == "save" else None
        if p is None:
            continue
        target = Path(os.path.normpath(base / Path(p).expanduser()))
        for other, sid, j in seen:
            if target == other or other in target.parents or target in other.parents:
                how = "the same folder as" if target == other else "a folder nested with that of"
                line, col = positions.of(("steps", i, "path"))
                problems.append(f"{path}:{line}:{col}: step '{step.id}': field 'path': writes {how} "
                                f"step '{sid}' (line {positions.of(('steps', j, 'path'))[0]}): give each save "
                                "its own folder")
        seen.append((target, step.id, i))
    return problems


def _union_label(part: Any) -> bool:
    """True for the parts of an error location that name a union member (``float``, ``list[float]``)."""
    return isinstance(part, str) and (part in _TYPE_LABELS or "[" in part or part.startswith(("function-", "constrained-")))


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """The errors with union-member labels dropped from their locations; where a union's members
    disagree about one field (a scalar-or-list ``PerInput``), the type mismatches of the members
    that do not apply are left out, so each field gets the message of the member that fits."""
    errors = [{**e, "loc": tuple(p for p in e["loc"] if not _union_label(p))} for e in exc.errors()]
    kinds: dict[tuple[Any, ...], set[str]] = {}
    for e in errors:
        kinds.setdefault(e["loc"], set()).add(e["type"])
    return [e for e in errors
            if not (e["type"].endswith("_type") and any(not k.endswith("_type") for k in kinds[e["loc"]]))]


def _format_errors(exc: ValidationError, data: dict[str, Any], positions: Positions, path: str) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for err in _field_errors(exc):
        loc = err["loc"]
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


_TYPE_LABELS = {"float", "int", "str", "bool", "list", "dict"}
_TAGS = {*OPS, *METHODS}
# pydantic's names of union branches in error locations ("constrained-float", "list[float]")
_BRANCH = re.compile(r"[\[\-]|^(float|int|str|bool|none)$")
