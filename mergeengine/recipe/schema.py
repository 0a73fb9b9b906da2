"""The recipe schema: a discriminated union on ``op`` (and on ``method`` for merges).

Each op module declares its own step model; this module only assembles them, so adding an op
never touches the schema.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from mergeengine.methods import METHODS
from mergeengine.ops import OPS, _load_all

_load_all()



def _any_step() -> Any:
    """The union of every op's step model and every registered merge method's."""
    merge = Annotated[
        Union[tuple(METHODS[m].step for m in sorted(METHODS))],  # noqa: UP007 - built at runtime
        Field(discriminator="method"),
    ]
    return Annotated[
        Union[tuple([op.Step for name, op in OPS.items() if name != "merge"] + [merge])],  # noqa: UP007
        Field(discriminator="op"),
    ]


AnyStep = _any_step()


class SearchFactor(BaseModel):
    """One DPA partition factor to tune (shorthand for the parameter ``STEP.partitions[i].scale``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str = Field(description="A dpa_amplify step.")
    partition: int = Field(ge=0, description="Index of the partition (0 = the densest-ranked, first).")
    start: float | None = Field(None, ge=0, description="Start value (default: the recipe's scale).")


class SearchParam(BaseModel):
    """One numeric recipe field to tune, addressed as ``STEP.FIELD``, ``STEP.FIELD[i]`` or deeper."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    param: str = Field(description="Address: step id, then fields and list indices, e.g. `merged.weights[1]`.")
    bounds: tuple[float, float] | None = Field(None, alias="range", description="Lowest and highest value.")
    choices: list[float] | None = Field(None, min_length=1, description="The values to try (instead of a range).")
    step: float | None = Field(None, gt=0, description="Grid spacing of a range (grid: required; others: snap to it).")
    start: float | None = Field(None, description="Where coordinate ascent and CMA-ES start (default: the recipe's value).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if (self.bounds is None) == (self.choices is None):
            raise ValueError("give either 'range: [low, high]' or 'choices: [...]'")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"range [{self.bounds[0]}, {self.bounds[1]}]: low must be below high")
        return self


class LmEvalTasks(BaseModel):
    """lm-evaluation-harness tasks as the search objective (needs ``mergeengine[lmeval]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lm_eval: list[str] = Field(min_length=1, description="lm-eval task names.")
    include_path: str | None = Field(None, description="Folder of local task YAMLs, relative to the recipe.")
    metric: str | None = Field(None, description="Metric to score (default: each task's first metric).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (default: the task's).")


class SearchSpec(BaseModel):
    """The parameter search: a strategy over a space of recipe fields, scored on validation tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: str | LmEvalTasks = Field(
        description="Evaluation task file (validation split), relative to the recipe, or `{lm_eval: [...]}`."
    )
    references: dict[str, float | str] = Field(
        default_factory=dict,
        description="Per task: the dense fine-tuned score, or the load step of the dense expert to evaluate for it "
        "(default: the task file's `reference`).",
    )
    target: str | None = Field(None, description="Save step whose model is evaluated (default: the only one).")
    strategy: Literal["coordinate", "grid", "random", "cma", "tpe"] = Field(
        "coordinate", description="How candidates are chosen."
    )
    space: list[SearchParam] = Field(default_factory=list, description="Fields to tune, in order.")
    factors: list[SearchFactor] = Field(default_factory=list, description="DPA partition factors to tune, in order.")
    trials: int | None = Field(None, ge=1, description="Trial budget (random, cma, tpe).")
    population: int | None = Field(None, ge=2, description="Candidates asked at once (cma: its popsize; tpe).")
    seed: int = Field(0, ge=0, description="Seed of the random, cma and tpe strategies.")
    step_size: float = Field(0.1, gt=0, description="Increment of a factor.")
    max_steps: int = Field(30, ge=1, description="Most increments per factor.")
    limit: int | None = Field(None, ge=1, description="At most this many records per task.")
    in_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="Build candidates in memory (auto: when the model fits in a third of free RAM)."
    )
    batch_size: int = Field(32, ge=1, description="Evaluation batch size.")

    @model_validator(mode="after")
    def _space_and_budget(self) -> SearchSpec:
        if not self.space and not self.factors:
            raise ValueError("name the fields to tune in 'space' (or the DPA 'factors')")
        if self.factors and self.strategy != "coordinate":
            raise ValueError("'factors' is the coordinate ascent's shorthand; with another strategy use 'space'")
        if self.strategy in ("random", "cma", "tpe") and self.trials is None:
            raise ValueError(f"strategy '{self.strategy}' needs a trial budget: 'trials: N'")
        return self


class Recipe(BaseModel):
    """A whole recipe: metadata and the ordered list of steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("merge", description="Name of the recipe (used in the model card).")
    description: str = Field("", description="Free text for humans.")
    seed: int = Field(0, ge=0, description="Seed of every random choice (DARE drops), per step and tensor.")
    steps: list[AnyStep] = Field(min_length=1, description="The steps, in order; a step may only use earlier ones.")  # type: ignore[valid-type]
    search: SearchSpec | None = Field(None, description="Optional parameter search (see docs/recipes.md).")
    provenance: dict[str, Any] | None = Field(
        None, description="Written by mergeengine into mergeengine.json; ignored when running."
    )


_MODELS: dict[tuple[str, ...], type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """The recipe model for the merge methods registered now: :class:`Recipe`, or a subclass whose
    ``steps`` also accept methods registered after this module was imported."""
    key = tuple(sorted(METHODS))
    if key == _BUILT_WITH:
        return Recipe
    if key not in _MODELS:
        steps = (list[_any_step()], Recipe.model_fields["steps"])  # type: ignore[misc]
        _MODELS[key] = create_model("Recipe", __base__=Recipe, steps=steps)
    return _MODELS[key]


_BUILT_WITH = tuple(sorted(METHODS))


def step_fields(step: dict[str, Any]) -> list[str]:
    """The field names (YAML spelling) accepted for a raw step dict, for did-you-mean hints."""
    op = step.get("op")
    if op == "merge":
        method = METHODS.get(step.get("method", ""))
        model = method.step if method is not None else None
    else:
        cls = OPS.get(op) if isinstance(op, str) else None
        model = cls.Step if cls is not None else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


#: The largest finite float32: every numeric field is applied to float32 tensors.
FLOAT32_MAX = 3.4028234663852886e38


def out_of_range_numbers(recipe: Recipe) -> list[tuple[tuple[Any, ...], str]]:
    """Every float in the recipe's steps and search block that is NaN, infinite or beyond float32.

    Checked once here, for every op and merge method (also those defined later), on the validated
    values (so ``"1e39"`` written as a string is caught too). ``provenance`` is not checked.

    Returns:
        ``(location, message)`` pairs; a location is a path such as ``("steps", 3, "lambda")``
        using the YAML spelling of each field.
    """
    found = []
    for loc, value in _numbers(recipe, ()):
        if loc and loc[0] == "provenance":
            continue
        if not math.isfinite(value):
            found.append((loc, f"must be a finite number, got {value}"))
        elif abs(value) > FLOAT32_MAX:
            found.append((loc, f"{value:g} is out of float32 range (|x| <= 3.4e38)"))
    return found


def _numbers(value: Any, loc: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], float]]:
    if isinstance(value, float):  # float fields hold floats once validated; int fields (seed, sizes) are no weights
        yield loc, value
    elif isinstance(value, BaseModel):
        for name, f in type(value).model_fields.items():
            yield from _numbers(getattr(value, name), (*loc, f.alias or name))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, (*loc, i))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, (*loc, k))
