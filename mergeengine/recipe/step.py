"""The fields every recipe step shares (torch-free: validation imports only this and pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

#: When merge or diff inputs have more embedding/lm_head rows than the base.
VocabPolicy = Literal["error", "truncate", "pad_base"]


class StepModel(BaseModel):
    """Fields shared by every step. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=STEP_ID_PATTERN, description="Unique name of the step; other steps refer to it.")
    op: str
