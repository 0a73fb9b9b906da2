"""mergekit's merge configuration (``mergekit-yaml`` files), as pydantic models that forbid unknown keys.

The models follow mergekit 0.1.5's ``MergeConfiguration``: every key it defines is declared here
(so a key mergekit knows and mergeengine does not support is rejected by name in
:mod:`mergeengine.recipe.mergekit`, never dropped), and a key mergekit does not know is an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A parameter: a number, a gradient (list of numbers), a bool, or a list of {filter, value}.
ParameterSetting = Any

# Keys that tell a mergekit config from a mergeengine recipe.
MERGEKIT_KEYS = frozenset({"merge_method", "models", "slices", "modules", "base_model"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelPath(_Strict):
    """``{path, revision}``, mergekit's long form of a model string."""

    path: str
    revision: str | None = None


class ModelReferenceSpec(_Strict):
    """mergekit's long form of a model reference."""

    model: str | ModelPath
    lora: str | ModelPath | None = None
    override_architecture: str | None = None


ModelReference = str | ModelReferenceSpec


class InputModel(_Strict):
    """One entry of ``models:``."""

    model: ModelReference
    parameters: dict[str, ParameterSetting] | None = None


class InputSlice(_Strict):
    """One source of an output slice."""

    model: ModelReference
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None


class OutputSlice(_Strict):
    """One entry of ``slices:``."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    residual_weight: float | None = None
    parameters: dict[str, ParameterSetting] | None = None


class OutputModule(_Strict):
    """One entry of ``modules:`` (mergekit's per-module merge: ``models`` or ``slices``, and parameters)."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module takes exactly one of 'models' or 'slices'")
        return self


class TokenEmbedding(_Strict):
    """``tokenizer.tokens.<token>``: where an embedding row comes from."""

    source: Any = None
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's ``tokenizer:`` block."""

    source: str | ModelReferenceSpec = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class MergekitConfig(_Strict):
    """A whole mergekit configuration."""

    merge_method: str
    base_model: ModelReference | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | ModelReferenceSpec | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> MergekitConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or a 'tokenizer' block, not both")
        return self


def is_mergekit_config(data: Any) -> bool:
    """Whether parsed YAML is a mergekit config (``merge_method`` and no ``steps``)."""
    return isinstance(data, dict) and "steps" not in data and "merge_method" in data


Dtype = Literal["float32", "float16", "bfloat16"]
