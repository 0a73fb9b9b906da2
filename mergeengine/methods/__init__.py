"""Merge methods: a typed function, turned into ``op: merge, method: <name>`` by :func:`merge_method`.

```python
import torch
from mergeengine.methods import merge_method

@merge_method(name="max_abs", inputs="deltas")
def max_abs(base: torch.Tensor, deltas: list[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    \"\"\"Per entry the delta of largest magnitude, times scale, added to the base.\"\"\"
    stacked = torch.stack(deltas)
    return base + scale * stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]
```
used as ``{id: m, op: merge, method: max_abs, base: base, inputs: [d1, d2], scale: 0.5}``.

The function's keyword-only parameters (type hints + defaults) are the method's recipe fields,
validated by pydantic like every other step field; a trailing underscore is dropped from the field
name (``lambda_`` is ``lambda``). ``PerInput[T]`` takes a scalar or one value per input and is
passed as a list. ``generator`` is injected by the engine (a CPU generator per step and tensor).
Built-in methods live one file each in this package; other packages register theirs under the
entry-point group ``mergeengine.methods`` (the value is a module or a decorated function:
importing it registers). See docs/architecture.md, "How to add a merge method".

This module imports no torch: validating a recipe needs only the methods' signatures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, create_model, model_validator

from mergeengine.errors import MergeEngineError
from mergeengine.recipe.step import StepModel, VocabPolicy

if TYPE_CHECKING:
    from mergeengine.ops.base import Reduction

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "Density", "Fraction", "MergeMethod", "MergeStep", "PerInput", "get_method", "load_methods",
           "merge_method"]

ENTRY_POINT_GROUP = "mergeengine.methods"
InputKind = Literal["deltas", "models"]
BaseUse = Literal["required", "optional", "none"]
#: Keyword-only parameters the engine fills in (never recipe fields).
ENGINE_PARAMETERS = frozenset({"generator"})
#: A keep fraction in (0, 1], the type of the ``density`` fields.
Density = Annotated[float, Field(gt=0, le=1)]
#: A fraction in [0, 1].
Fraction = Annotated[float, Field(ge=0, le=1)]


class _PerInputMarker:
    """The metadata that marks a :class:`PerInput` field."""

    def __repr__(self) -> str:
        return "PerInput"


PER_INPUT = _PerInputMarker()


class PerInput:
    """``PerInput[float]``: one value per input. The recipe gives a scalar (used for every input)
    or a list as long as ``inputs``; the method receives a list.

    Example: ``density: PerInput[Annotated[float, Field(gt=0, le=1)]] = 0.2``.
    """

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[Union[item, list[item]], PER_INPUT]  # noqa: UP007 - built at runtime


class MergeStep(StepModel):
    """Fields every merge has; each method adds its own (see :func:`merge_method`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    op: Literal["merge"]
    method: str
    base: str | None = Field(None, description="Step id of the base model (required unless the method says otherwise).")
    inputs: list[str] = Field(min_length=1, description="Step ids of deltas or models to merge.")
    vocab: VocabPolicy = Field(
        "error",
        description="When inputs have more embedding/lm_head rows than the base: error, "
        "truncate (to the base's rows) or pad_base (zero rows added, output takes the largest vocabulary).",
    )

    @model_validator(mode="after")
    def _check_method(self) -> MergeStep:
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if PER_INPUT in info.metadata and isinstance(value, list) and len(value) != len(self.inputs):
                raise ValueError(f"{info.alias or name} has {len(value)} entries but inputs has {len(self.inputs)}")
        method = METHODS.get(self.method)
        if method is not None and method.validate is not None:
            method.validate(self.parameters())
        return self

    def parameters(self) -> dict[str, Any]:
        """The method's keyword arguments (Python names); per-input values as one list entry per input."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            if name in MergeStep.model_fields:
                continue
            value = getattr(self, name)
            if PER_INPUT in info.metadata and not isinstance(value, list):
                value = [value] * len(self.inputs)
            out[name] = value
        return out


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function and what the engine needs to know to call it.

    Attributes:
        name: the recipe's ``method``.
        function: ``(base, inputs, **parameters) -> result``.
        inputs: ``deltas`` (input - base) or ``models`` (the fine-tuned tensors).
        base: ``required``, ``optional`` (None when the recipe gives none) or ``none`` (always None).
        elementwise: the function may be called on flat chunks (the engine streams it).
        step: the pydantic model of the method's recipe step.
        compute_bound: its math, not its I/O, dominates (the executor gives torch every core).
        validate: extra checks of the parameters (raise ValueError); run at validation.
        prepare: per tensor, before the chunks: ``prepare(stream, **parameters)`` returns the
            values of the parameters named in ``provides`` (see :class:`mergeengine.ops.chunks.TensorStream`).
        provides: keyword-only parameters filled by ``prepare`` (not recipe fields).
        statistics: ``statistics(parameters_of, tensors)`` -> whole-model reductions whose ``map``
            gets the method's inputs of one tensor; their results reach ``prepare`` as
            ``stream.stats``. ``parameters_of(tensor)`` is the parameters as scheduled for that tensor.
        report: ``report(step, stats)`` -> the step's entry of ``dppa_report.json``.
        chunk_numel: ``chunk_numel(shape)`` -> entries per chunk of a tensor of that shape, for an
            element-wise method that works on blocks of whole rows (default: the engine's chunk).
    """

    name: str
    function: Callable[..., Any]
    inputs: InputKind
    base: BaseUse
    elementwise: bool
    step: type[MergeStep]
    compute_bound: bool = False
    validate: Callable[[Mapping[str, Any]], None] | None = None
    prepare: Callable[..., Mapping[str, Any]] | None = None
    provides: tuple[str, ...] = ()
    statistics: Callable[[Callable[[str], Mapping[str, Any]], list[str]], list[Reduction]] | None = None
    report: Callable[[MergeStep, Mapping[str, Any]], dict[str, Any]] | None = None
    chunk_numel: Callable[[tuple[int, ...]], int] | None = None

    @property
    def wants_generator(self) -> bool:
        """Whether the function takes the engine's ``generator``."""
        return "generator" in inspect.signature(self.function).parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def merge_method(
    name: str,
    *,
    inputs: InputKind = "deltas",
    base: BaseUse = "required",
    elementwise: bool = False,
    compute_bound: bool = False,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    prepare: Callable[..., Mapping[str, Any]] | None = None,
    provides: tuple[str, ...] = (),
    statistics: Callable[[Callable[[str], Mapping[str, Any]], list[str]], list[Reduction]] | None = None,
    report: Callable[[MergeStep, Mapping[str, Any]], dict[str, Any]] | None = None,
    chunk_numel: Callable[[tuple[int, ...]], int] | None = None,
) -> Callable[[Callable[..., Any]], MergeMethod]:
    """Decorator: register ``function`` as the merge method ``name``.

    Args:
        name: the recipe's ``method`` value.
        inputs: ``deltas`` (each input minus the base; models given as inputs are diffed) or
            ``models`` (deltas given as inputs are added back to their base).
        base: ``required``, ``optional`` or ``none``.
        elementwise: output entry i depends only on entry i of the inputs: the engine calls the
            function on flat chunks (padding, fused diffs and the output dtype are its business).
        compute_bound, validate, prepare, provides, statistics, report, chunk_numel: see :class:`MergeMethod`.

    Returns:
        A decorator returning the registered :class:`MergeMethod` (callable like the function).

    Raises:
        MergeEngineError: the name is taken. TypeError: the signature is not ``(base, inputs, *, ...)``.
    """

    def decorate(function: Callable[..., Any]) -> MergeMethod:
        step = _step_model(name, function, set(provides) | ENGINE_PARAMETERS)
        method = MergeMethod(name, function, inputs, base, elementwise, step, compute_bound, validate, prepare,
                             tuple(provides), statistics, report, chunk_numel)
        register(method)
        return method

    return decorate


def _step_model(name: str, function: Callable[..., Any], injected: set[str]) -> type[MergeStep]:
    """The pydantic step model whose fields are ``function``'s keyword-only parameters."""
    params = list(inspect.signature(function).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError(f"merge method '{name}': the signature must be (base, inputs, *, parameters...)")
    docs = _argument_docs(function.__doc__ or "")
    fields: dict[str, Any] = {"method": (Literal[name], Field(description="The merge method."))}
    for p in params:
        if p.kind != p.KEYWORD_ONLY or p.name in injected:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise TypeError(f"merge method '{name}': parameter '{p.name}' needs a type hint")
        alias = p.name[:-1] if p.name.endswith("_") else None
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (_annotation(function, p.annotation),
                          Field(default, alias=alias, description=docs.get(p.name, "")))
    title = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]", name)) + "Step"
    return create_model(title, __base__=MergeStep, __module__=function.__module__, **fields)


def _annotation(function: Callable[..., Any], annotation: Any) -> Any:
    """A parameter's type hint, evaluated in the function's module when it is a string."""
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(vars(sys.modules[function.__module__]))
    namespace.setdefault("PerInput", PerInput)
    return eval(annotation, namespace)  # noqa: S307 - the method's own source, like typing.get_type_hints


def _argument_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section (the fields' descriptions)."""
    out: dict[str, str] = {}
    current, inside = None, False
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() == "Args:":
            inside = True
        elif inside and line and not line.startswith(" "):
            break  # the next section
        elif inside and (m := re.match(r" {4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)):
            current = m.group(1)
            out[current] = m.group(2)
        elif inside and current and line.strip():
            out[current] += " " + line.strip()
    return out


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry. Raises MergeEngineError when the name is taken."""
    if method.name in METHODS:
        first = METHODS[method.name].function.__module__
        raise MergeEngineError(f"merge method '{method.name}' is registered twice ({first}, "
                               f"{method.function.__module__})")
    METHODS[method.name] = method
    return method


_LOADED = False


def load_methods() -> dict[str, MergeMethod]:
    """Import the built-in method modules and the ``mergeengine.methods`` entry points, once.

    Raises:
        MergeEngineError: a plugin failed to import, or two methods share a name.
    """
    global _LOADED
    if _LOADED:
        return METHODS
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except MergeEngineError:
            raise
        except Exception as exc:  # a broken plugin: name it, one line
            raise MergeEngineError(f"merge method plugin '{entry.name}' ({entry.value}) failed to load: "
                                   f"{type(exc).__name__}: {exc}") from exc
    return METHODS


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``.

    Raises:
        MergeEngineError: unknown name, with the available ones listed.
    """
    methods = load_methods()
    if name not in methods:
        raise MergeEngineError(f"Unknown merge method '{name}'. Available: {', '.join(sorted(methods))}")
    return methods[name]
