"""The fields every recipe step shares (torch-free: validation imports only this and pydantic)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str) -> str:
    """Refuse control characters: a newline in a path would split (or forge) the one-line messages naming it."""
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"must not contain control characters (found {found.group()!r} at position {found.start()})")
    return value


#: A path or name from the recipe that messages show: any text without control characters.
PathText = Annotated[str, AfterValidator(_printable)]

#: When merge or diff inputs have more embedding/lm_head rows than the base.
VocabPolicy = Literal["error", "truncate", "pad_base"]


class StepModel(BaseModel):
    """Fields shared by every step. Unknown fields are errors; so are NaN and Inf in any float field
    (``recipe.schema.out_of_range_numbers`` also refuses values beyond float32, nested ones included)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    id: str = Field(pattern=STEP_ID_PATTERN, description="Unique name of the step; other steps refer to it.")
    op: str
