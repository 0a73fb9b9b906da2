"""The recipe schema: a discriminated union on ``op`` (and on ``method`` for merges).

Each op module declares its own step model; this module only assembles them, so adding an op
never touches the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from mergeengine.methods import METHODS
from mergeengine.ops import OPS, _load_all

_load_all()

_MergeStep = Annotated[
    Union[tuple(METHODS[m].step for m in sorted(METHODS))],  # noqa: UP007 - built at runtime
    Field(discriminator="method"),
]
AnyStep = Annotated[
    Union[tuple([op.Step for name, op in OPS.items() if name != "merge"] + [_MergeStep])],  # noqa: UP007
    Field(discriminator="op"),
]


class SearchFactor(BaseModel):
    """One DPA partition factor to tune."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str = Field(description="A dpa_amplify step.")
    partition: int = Field(ge=0, description="Index of the partition (0 = the densest-ranked, first).")
    start: float | None = Field(None, ge=0, description="Start value (default: the recipe's scale).")


class SearchSpec(BaseModel):
    """The DPA factor search (DPPA.md): coordinate ascent on a validation score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: str = Field(description="Evaluation task file (validation split), relative to the recipe.")
    references: dict[str, float] = Field(
        default_factory=dict, description="Dense fine-tuned scores per task (default: the task file's `reference`)."
    )
    target: str | None = Field(None, description="Save step whose model is evaluated (default: the only one).")
    factors: list[SearchFactor] = Field(min_length=1, description="Factors to tune, in order.")
    step_size: float = Field(0.1, gt=0, description="Increment of a factor.")
    max_steps: int = Field(30, ge=1, description="Most increments per factor.")
    limit: int | None = Field(None, ge=1, description="At most this many records per task.")
    in_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="Build candidates in memory (auto: when the model fits in a third of free RAM)."
    )
    batch_size: int = Field(32, ge=1, description="Evaluation batch size.")


class Recipe(BaseModel):
    """A whole recipe: metadata and the ordered list of steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("merge", description="Name of the recipe (used in the model card).")
    description: str = Field("", description="Free text for humans.")
    seed: int = Field(0, ge=0, description="Seed of every random choice (DARE drops), per step and tensor.")
    steps: list[AnyStep] = Field(min_length=1, description="The steps, in order; a step may only use earlier ones.")  # type: ignore[valid-type]
    search: SearchSpec | None = Field(None, description="Optional DPA factor search (see docs/recipes.md).")
    provenance: dict[str, Any] | None = Field(
        None, description="Written by mergeengine into mergeengine.json; ignored when running."
    )


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
