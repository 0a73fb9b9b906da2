"""The recipe schema: a discriminated union on ``op`` (and on ``method`` for merges).

Each op module declares its own step model; this module only assembles them, so adding an op
never touches the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field

from mergeengine.ops import MERGE_METHODS, OPS, _load_all

_load_all()

_MergeStep = Annotated[
    Union[tuple(m.Step for m in MERGE_METHODS.values())],  # noqa: UP007 - built at runtime
    Field(discriminator="method"),
]
AnyStep = Annotated[
    Union[tuple([op.Step for op in OPS.values()] + [_MergeStep])],  # noqa: UP007
    Field(discriminator="op"),
]


class Recipe(BaseModel):
    """A whole recipe: metadata and the ordered list of steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("merge", description="Name of the recipe (used in the model card).")
    description: str = Field("", description="Free text for humans.")
    seed: int = Field(0, ge=0, description="Seed of every random choice (DARE drops), per step and tensor.")
    steps: list[AnyStep] = Field(min_length=1, description="The steps, in order; a step may only use earlier ones.")  # type: ignore[valid-type]
    search: Any = Field(None, description="Optional DPA factor search block (see docs/recipes.md).")
    provenance: dict[str, Any] | None = Field(
        None, description="Written by mergeengine into mergeengine.json; ignored when running."
    )


def step_fields(step: dict[str, Any]) -> list[str]:
    """The field names (YAML spelling) accepted for a raw step dict, for did-you-mean hints."""
    op = step.get("op")
    if op == "merge":
        cls = MERGE_METHODS.get(step.get("method", ""))
    else:
        cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        return []
    return [f.alias or n for n, f in cls.Step.model_fields.items()]
