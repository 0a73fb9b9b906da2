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
from pathlib import PurePosixPath
from typing import Literal

import torch
from pydantic import Field, field_validator

from mergeengine.errors import ShapeError
from mergeengine.ops import register
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TaskContext, TensorMeta
from mergeengine.ops.vocab import is_vocab_tensor, pad_rows
from mergeengine.recipe.step import PathText

#: Files the writer produces: ``copy_files`` may not name them (they would replace the merge's own).
WRITER_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", "README.md",
                          "mergeengine.json", "dppa_report.json", ".mergeengine-progress.json"})
#: The storage dtypes a save accepts (torch attribute names).
DTYPES = ("float32", "float16", "bfloat16")
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
    path: PathText | None = Field(None, description="Output folder; `run --out` overrides it.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Storage dtype; default: the dtype of the model the output's config comes from."
    )
    max_shard_bytes: int = Field(5 * 10**9, gt=0, description="Largest shard file, e.g. 5GB, 500MB.")
    tokenizer_from: str | None = Field(None, description="Load step whose tokenizer files are copied (default: the origin model).")
    copy_files: list[PathText] = Field(default_factory=list, description="Extra files copied from the origin model's folder.")
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

    @field_validator("copy_files")
    @classmethod
    def _inside_the_model(cls, names: list[str]) -> list[str]:
        for name in names:
            p = PurePosixPath(name.replace("\\", "/"))
            if not name or p.is_absolute() or name.startswith("~") or ".." in p.parts:
                raise ValueError(f"'{name}' must name a file inside the model's folder (no absolute path, no '..')")
            if p.name in WRITER_FILES or p.name.endswith(".safetensors"):
                raise ValueError(f"'{name}' would replace the merge's own {p.name}")
        targets = [PurePosixPath(n.replace("\\", "/")).name for n in names]
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise ValueError(f"two files would be copied to the same name: {', '.join(twice)}")
        return names


def _base_rows_for(base: torch.Tensor, delta: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
    """The base of a delta, zero-padded to the delta's rows where the delta has the fine-tune's larger
    vocabulary (a ``diff`` with ``vocab: pad_base``)."""
    if base.shape == delta.shape:
        return base
    if is_vocab_tensor(ctx.tensor) and base.shape[1:] == delta.shape[1:] and base.shape[0] < delta.shape[0]:
        return pad_rows(base, delta.shape[0])
    raise ShapeError(f"the delta has shape {list(delta.shape)} and its base {list(base.shape)}",
                     step=ctx.step, tensor=ctx.tensor)


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
        return StepKind("model", origin=src.origin), problems

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """The stored dtype (default: the origin model's) is the plan's ``emit_dtype``; a delta
        input's base is read too (``read_from``)."""
        dtype = getattr(torch, self.step.dtype) if self.step.dtype else inputs.model_dtype
        metas = {n: TensorMeta(m.shape, dtype if m.dtype.is_floating_point else m.dtype)
                 for n, m in inputs.metas[self.step.input].items()}
        src = inputs.kinds[self.step.input]
        read_from = {self.step.input: (self.step.input, src.base)} if src.kind == "delta" else {}
        return StepPlan(metas, inputs.kinds[self.step.id], input_kinds={self.step.input: src.kind},
                        read_from=read_from, emit_dtype=dtype)  # type: ignore[arg-type]

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        return [(s, name) for s in plan.read_from.get(self.step.input, (self.step.input,))]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        x = inputs[0]
        if len(inputs) == 2:  # a delta: written as base + delta
            x = _base_rows_for(inputs[1], x, ctx).float() + x
        if x.dtype.is_floating_point:
            x = x.to(ctx.plan.emit_dtype)
        return x.to("cpu").contiguous()
