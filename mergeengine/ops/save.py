"""``save``: write a model folder (config, safetensors shards, tokenizer) that transformers loads.

```yaml
- {id: out, op: save, input: merged, path: ./merged, dtype: bfloat16}
```
A delta given to ``save`` is written as the model it describes (``base + delta``), so a pruned
delta can be evaluated directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field, field_validator

from mergeengine.ops import register
from mergeengine.ops.base import Op, StepKind, StepModel, TaskContext, TensorMeta

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: int | str) -> int:
    """``5GB`` -> 5_000_000_000; ``512MiB`` -> 536_870_912; ints pass through.

    Raises:
        ValueError: not a size.
    """
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"'{value}' is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class SaveStep(StepModel):
    """Write a model (or base + delta) as a Hugging Face folder."""

    op: Literal["save"]
    input: str = Field(description="Step id of the model (or delta) to write.")
    path: str | None = Field(None, description="Output folder; `run --out` overrides it.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Storage dtype; default: the dtype of the model the output's config comes from."
    )
    max_shard_bytes: int = Field(5 * 10**9, gt=0, description="Largest shard file, e.g. 5GB, 500MB.")
    tokenizer_from: str | None = Field(None, description="Load step whose tokenizer files are copied (default: the origin model).")
    copy_files: list[str] = Field(default_factory=list, description="Extra files copied from the origin model's folder.")
    chat_template: str | None = Field(
        None, description="Chat template written into tokenizer_config.json: auto (the inputs' most common), "
        "chatml, llama3, mistral, alpaca, or a Jinja template string."
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        from mergeengine.io.chat_template import check_chat_template

        return None if v is None else check_chat_template(v)

    @field_validator("max_shard_bytes", mode="before")
    @classmethod
    def _parse_size(cls, v: int | str) -> int:
        return parse_bytes(v)


@register
class SaveOp(Op):
    """Per tensor: cast to the storage dtype on the CPU; the executor streams it into the writer."""

    name = "save"
    Step = SaveStep
    step: SaveStep

    def references(self) -> dict[str, list[str]]:
        refs = {"input": [self.step.input]}
        if self.step.tokenizer_from:
            refs["tokenizer_from"] = [self.step.tokenizer_from]
        return refs

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        problems = []
        tok = self.step.tokenizer_from
        if tok and tok in kinds and kinds[tok].origin != tok:
            problems.append(("tokenizer_from", f"'{tok}' is not a load step"))
        src = kinds.get(self.step.input)
        if src is None:
            return None, problems
        self.input_kind = src
        return StepKind("model", origin=src.origin), problems

    def set_dtype(self, default: torch.dtype) -> None:
        """Fix the storage dtype (the planner passes the origin model's dtype as default)."""
        self.out_dtype = DTYPES[self.step.dtype] if self.step.dtype else default

    def plan_tensors(self, inputs: Mapping[str, dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
        return {
            n: TensorMeta(m.shape, self.out_dtype if m.dtype.is_floating_point else m.dtype)
            for n, m in inputs[self.step.input].items()
        }

    def sources(self, name: str) -> list[tuple[str, str]]:
        src = [(self.step.input, name)]
        if self.input_kind.kind == "delta":
            src.append((self.input_kind.base, name))
        return src

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        x = inputs[0]
        if self.input_kind.kind == "delta":
            x = inputs[1].float() + x
        if x.dtype.is_floating_point:
            x = x.to(self.out_dtype)
        return x.to("cpu").contiguous()
