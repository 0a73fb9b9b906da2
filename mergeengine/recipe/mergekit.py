"""mergekit configs in, mergeengine recipes out (``mergeengine convert``, and ``run`` on a mergekit file).

A config is validated against mergekit's schema (:mod:`mergeengine.recipe.mergekit_schema`), then
translated into steps: one ``load`` per model, one ``merge`` with mergekit's parameters mapped
onto the method's fields (per-model parameters become per-input lists, gradients and filters
become schedules, see :mod:`mergeengine.recipe.schedule`), and one ``save``. Where mergekit's
default differs from mergeengine's, the translation picks mergekit's behaviour and says so in a
comment of the written recipe. A key mergeengine cannot honour is an error naming it.

Example:
    >>> text = convert_text(Path("mergekit.yml").read_text(), "mergekit.yml")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergeengine.errors import OutputError, RecipeError
from mergeengine.io.chat_template import check_chat_template
from mergeengine.recipe.loader import _BRANCH, _TAGS, LoadedRecipe, Positions, validate_data
from mergeengine.recipe.mergekit_methods import METHODS, ConvertError, MethodSpec, layer_params, merge_fields
from mergeengine.recipe.mergekit_schema import (
    InputModel,
    MergekitConfig,
    ModelPath,
    ModelReference,
    ModelReferenceSpec,
)
from mergeengine.recipe.mergekit_slices import convert_slices
from mergeengine.recipe.mergekit_vocab import slice_aligner, vocab_steps

YPath = tuple[Any, ...]


@dataclass
class Converted:
    """A translated config: the recipe data, comments per step, and where each step came from."""

    data: dict[str, Any]
    header: list[str] = field(default_factory=list)
    comments: dict[int, list[str]] = field(default_factory=dict)
    origins: dict[YPath, YPath] = field(default_factory=dict)


class MappedPositions(Positions):
    """Positions of recipe paths, found in the mergekit file the steps were translated from."""

    def __init__(self, root: yaml.Node | None, origins: dict[YPath, YPath]) -> None:
        super().__init__(root)
        self.origins = origins

    def of(self, path: YPath, *, key: bool = False) -> tuple[int, int]:
        """The mergekit key a recipe path was made from (the longest translated prefix)."""
        path = tuple(p for p in path if not (isinstance(p, str) and (p in _TAGS or _BRANCH.search(p))))
        for n in range(len(path), 0, -1):
            origin = self.origins.get(tuple(path[:n]))
            if origin is not None:
                return super().of(origin, key=key and n == len(path))
        return super().of((), key=False)


def _ref_parts(ref: ModelReference, where: YPath) -> tuple[str, str | None]:
    """(model string for a load step, revision) of a mergekit model reference."""
    if isinstance(ref, str):
        model, _, lora = ref.partition("+")
        path, _, revision = model.partition("@")
        return (f"{path}+{lora}" if lora else path), (revision or None)
    if isinstance(ref, ModelReferenceSpec):
        if ref.override_architecture:
            raise ConvertError((*where, "override_architecture"), "override_architecture is not supported: "
                               "mergeengine reads the architecture from the model's config.json")
        base, revision = _ref_parts(ref.model if isinstance(ref.model, str) else ref.model.path, where)
        if isinstance(ref.model, ModelPath):
            revision = ref.model.revision
        if ref.lora is not None:
            lora = ref.lora if isinstance(ref.lora, str) else ref.lora.path
            if isinstance(ref.lora, ModelPath) and ref.lora.revision:
                raise ConvertError((*where, "lora"), "a LoRA revision is not supported: give a local adapter folder")
            base = f"{base}+{lora}"
        return base, revision
    raise ConvertError(where, f"not a model reference: {ref!r}")


def _step_id(model: str, taken: set[str]) -> str:
    stem = model.split("+")[0].rstrip("/").split("/")[-1] or "model"
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem)
    if not re.match(r"[A-Za-z_]", stem):
        stem = "m_" + stem
    sid, n = stem, 2
    while sid in taken or sid in ("merge", "out"):
        sid, n = f"{stem}_{n}", n + 1
    taken.add(sid)
    return sid


def loader(conv: Converted, taken: set[str]) -> Callable[[ModelReference, YPath], str]:
    """``add(ref, where)``: the load step of a model reference, appended to ``conv`` on first use."""
    by_key: dict[tuple[str, str | None], str] = {}

    def add(ref: ModelReference, where: YPath) -> str:
        key = _ref_parts(ref, where)
        if key not in by_key:
            sid = _step_id(key[0], taken)
            step: dict[str, Any] = {"id": sid, "op": "load", "model": key[0]}
            if key[1]:
                step["revision"] = key[1]
            conv.origins[("steps", len(conv.data["steps"]))] = where
            conv.data["steps"].append(step)
            by_key[key] = sid
        return by_key[key]

    return add


def _loads(config: MergekitConfig, conv: Converted, add: Callable[[ModelReference, YPath], str]
           ) -> tuple[str | None, list[str]]:
    """One load step per distinct model; returns (base step id, input step ids in ``models`` order)."""
    base = add(config.base_model, ("base_model",)) if config.base_model is not None else None
    inputs = [add(m.model, ("models", i, "model")) for i, m in enumerate(config.models or [])]
    return base, inputs


def _num_layers(ref: ModelReference, base_dir: Path) -> int | None:
    """``num_hidden_layers`` from a local model's config.json (None when it is not local)."""
    import json

    path = Path(_ref_parts(ref, ())[0].split("+")[0]).expanduser()
    cfg = (path if path.is_absolute() else base_dir / path) / "config.json"
    try:
        return int(json.loads(cfg.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _single_module(config: MergekitConfig) -> MergekitConfig:
    """``modules: {default: ...}`` as the top-level form it means.

    mergekit names the one module of a text-only architecture ``default``; its ``models`` or
    ``slices`` are the config's, and its parameters sit between the slices' and the global ones
    (each falling back to the global value where its filters match nothing).
    """
    if not config.modules:
        return config
    names = list(config.modules)
    if names != ["default"]:
        raise ConvertError(("modules", names[0] if names[0] != "default" else names[1]),
                           "only mergekit's single 'default' module (a text-only architecture) has an equivalent; "
                           "per-module merges of multi-module architectures are not supported")
    module = config.modules["default"]
    return config.model_copy(update={"modules": None, "models": module.models, "slices": module.slices,
                                     "parameters": layer_params(module.parameters, config.parameters)})


def _as_models(config: MergekitConfig, base_dir: Path) -> MergekitConfig:
    """A config of one slice whose sources all span every layer, as the ``models`` form it means.

    Published SLERP and TIES merges often write ``slices: [{sources: [{model: a, layer_range: [0, 32]},
    ...]}]``; mergekit's gradients then run over those 32 layers exactly as over ``models``.
    """
    config = _single_module(config)
    if not config.slices:
        return config
    out = config.slices[0]
    ranges = {tuple(s.layer_range) for s in out.sources}
    whole = len(config.slices) == 1 and len(ranges) == 1 and next(iter(ranges))[0] == 0
    whole = whole and out.residual_weight is None and len(out.sources) > 1  # residual_weight: noted by the slices path
    if whole and all(_num_layers(s.model, base_dir) == s.layer_range[1] for s in out.sources):
        if out.base_model is not None:
            raise ConvertError(("slices", 0, "base_model"), "a slice's own 'base_model' is not supported")
        models = [InputModel(model=s.model, parameters=s.parameters) for s in out.sources]
        return config.model_copy(update={"slices": None, "models": models,
                                         "parameters": layer_params(out.parameters, config.parameters)})
    return config


def _save(config: MergekitConfig, conv: Converted, origin: str, merged: str) -> None:
    """The save step: storage dtype, tokenizer source."""
    step: dict[str, Any] = {"id": "out", "op": "save", "input": merged}
    notes = []
    dtype = config.out_dtype or config.dtype
    if dtype is not None:
        if dtype not in ("float32", "float16", "bfloat16"):
            key = "out_dtype" if config.out_dtype else "dtype"
            raise ConvertError((key,), f"dtype '{dtype}' is not supported (float32, float16, bfloat16)")
        step["dtype"] = dtype
    if config.dtype is not None and config.dtype != "float32":
        notes.append(f"mergekit computes in dtype {config.dtype}; mergeengine computes in float32 and stores "
                     f"{dtype}")
    _tokenizer(config, step, notes, origin)
    index = len(conv.data["steps"])
    conv.origins[("steps", index)] = ("merge_method",)
    conv.data["steps"].append(step)
    if notes:
        conv.comments[index] = notes


def _tokenizer(config: MergekitConfig, step: dict[str, Any], notes: list[str], origin: str) -> None:
    if config.chat_template is not None:
        try:
            step["chat_template"] = check_chat_template(config.chat_template)
        except ValueError as exc:
            raise ConvertError(("chat_template",), str(exc)) from None
        notes.append("chat_template written into tokenizer_config.json (a chat_template.jinja of the origin is "
                     "dropped)")
    if config.tokenizer_source is None and config.tokenizer is None:
        notes.append(f"tokenizer and config.json from '{origin}' (mergekit: the base model's)")


def convert_config(config: MergekitConfig, name: str, base_dir: Path) -> Converted:
    """Translate a validated mergekit config into recipe data.

    Args:
        config: the validated config.
        name: the recipe's name.
        base_dir: the folder relative model paths are read from (for layer counts).

    Raises:
        ConvertError: a key mergeengine cannot honour.
    """
    config = _as_models(config, base_dir)
    spec: MethodSpec | None = METHODS.get(config.merge_method)
    if spec is None:
        raise ConvertError(("merge_method",), f"merge_method '{config.merge_method}' has no mergeengine "
                           f"translation. Available: {', '.join(sorted(METHODS))}")
    conv = Converted({"name": name, "steps": []})
    conv.header.append(f"Converted from a mergekit config (merge_method: {config.merge_method}).")
    taken: set[str] = set()
    add = loader(conv, taken)
    if config.slices:
        origin, final = convert_slices(config, spec, conv, add, taken, slice_aligner(config, conv, add, taken))
        _save(config, conv, origin, final)
        return conv
    if spec.ours == "passthrough":
        raise ConvertError(("merge_method",), "passthrough takes layer 'slices', not 'models'")
    base, inputs = _loads(config, conv, add)
    base, inputs = vocab_steps(config, conv, base, inputs, add, taken)
    fields, notes, origins = merge_fields(spec, config, base, inputs)
    merge = {"id": "merge", "op": "merge", "method": spec.ours, **fields}
    index = len(conv.data["steps"])
    conv.origins[("steps", index)] = ("merge_method",)
    for where, origin in origins.items():
        conv.origins[("steps", index, *where)] = origin
    conv.data["steps"].append(merge)
    conv.comments[index] = notes
    _save(config, conv, base or inputs[0], "merge")
    return conv


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    return text.removesuffix("\n...").strip()  # a plain scalar's document end marker


def render(conv: Converted) -> str:
    """The recipe as readable YAML: one flow-style line per step, comments above the step they explain."""
    lines = [f"# {h}" for h in conv.header]
    lines.append(f"name: {_flow(conv.data['name'])}")
    lines.append("steps:")
    for i, step in enumerate(conv.data["steps"]):
        lines.extend(f"  # {c}" for c in conv.comments.get(i, []))
        lines.append(f"  - {_flow(step)}")
    return "\n".join(lines) + "\n"


def _schema_errors(exc: ValidationError, positions: Positions, path: str) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and re.search(r"[\[\-]|^(str|int)$", p)))
        line, col = positions.of(loc, key=err["type"] == "extra_forbidden")
        what = ".".join(str(p) for p in loc) or "config"
        if err["type"] == "extra_forbidden":
            msg = f"mergekit key '{what}' is not part of mergekit's config schema"
        else:
            msg = f"mergekit key '{what}': {err['msg'].removeprefix('Value error, ')}"
        out.append(f"{path}:{line}:{col}: {msg}")
    return list(dict.fromkeys(out))


def convert_data(data: dict[str, Any], positions: Positions, path: str) -> tuple[Converted, str]:
    """Validate and translate parsed mergekit YAML. Returns (translation, recipe text).

    Raises:
        RecipeError: a schema problem or an unsupported key, ``file:line:col`` in the mergekit file.
    """
    try:
        config = MergekitConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_schema_errors(exc, positions, path)) from None
    try:
        local = Path(path).resolve().parent if path != "<string>" else Path.cwd()
        conv = convert_config(config, Path(path).stem if path != "<string>" else "merge", local)
    except ConvertError as exc:
        line, col = positions.of(exc.where, key=True)
        raise RecipeError([f"{path}:{line}:{col}: mergekit key '{'.'.join(map(str, exc.where))}': "
                           f"{exc.message}"]) from None
    return conv, render(conv)


def mergekit_recipe(data: dict[str, Any], positions: Positions, path: str) -> LoadedRecipe:
    """A mergekit config as a loaded recipe: exactly what its conversion would run.

    Raises:
        RecipeError: as for any recipe, with positions in the mergekit file.
    """
    conv, text = convert_data(data, positions, path)
    return validate_data(conv.data, MappedPositions(positions.root, conv.origins), path, text)


def _refuse_writing_over_the_config(src: Path, dest: Path) -> None:
    """Raise if ``dest`` names the file ``src`` names, which the translation would replace.

    Raises:
        OutputError: naming ``dest``.
    """
    try:
        same = os.path.samefile(src, dest)  # any spelling: symlinks, "..", hard links
    except OSError:
        return  # one of them does not exist: not the same file (a missing config is reported on reading)
    if same:
        raise OutputError(f"is the mergekit config being converted ({src}); "
                          "write the recipe to another file", file=str(dest))


def convert_file(src: Path, dest: Path) -> str:
    """``mergeengine convert``: write the recipe a mergekit config translates to; returns its text.

    The recipe is validated before it is written (nothing is written on error), and written whole
    or not at all. ``dest`` may not be ``src`` itself (by any path, symlink or hard link).

    Raises:
        RecipeError: the config cannot be read, is not a mergekit config, or cannot be translated.
        OutputError: ``dest`` is the config itself, or the recipe cannot be written (the file is as it was).
    """
    from mergeengine.recipe.loader import load_recipe
    from mergeengine.recipe.mergekit_schema import is_mergekit_config

    _refuse_writing_over_the_config(src, dest)
    try:
        text = src.read_text()
        root, data = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError([f"{src}: cannot read mergekit config: {str(exc).splitlines()[0]}"]) from None
    if not is_mergekit_config(data):
        raise RecipeError([f"{src}:1:1: not a mergekit config (no top-level 'merge_method')"])
    load_recipe(src)  # every check a direct run makes, with positions in the mergekit file
    conv, out = convert_data(data, Positions(root), str(src))
    from mergeengine.io.output_guard import write_text_atomic

    write_text_atomic(dest, out)
    return out
