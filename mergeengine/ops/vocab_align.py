"""``vocab_align``: a model's embedding and lm_head rows laid out for a union vocabulary.

```yaml
- {id: math_u, op: vocab_align, model: math, models: [base, math, code], source: union}
```

``models`` are the models whose tokenizers form the vocabulary, the base first; ``source`` is
``union``, ``base`` or one of them (its tokenizer as it is). A row the model lacks is filled from
the models of ``fill_from`` (default: ``models``; see :mod:`mergeengine.io.vocabulary` for the
rule). Every model of a merge is aligned by its own step with the same ``models``, so their rows
line up and the merge runs on them as usual; a save downstream writes the output tokenizer, and
config.json's ``vocab_size`` is the aligned row count. Tensors other than embeddings and lm_head
pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeengine.errors import ShapeError
from mergeengine.io.vocabulary import (
    ZERO,
    Vocabulary,
    build_union,
    default_sources,
    load_tokenizer,
    save_tokenizer,
)
from mergeengine.ops import register
from mergeengine.ops.base import Op, PlanInputs, StepKind, StepModel, StepPlan, TaskContext, TensorMeta
from mergeengine.ops.vocab import is_vocab_tensor

if TYPE_CHECKING:  # validate imports no torch (mergeengine/lazy.py): checkpoint.py uses torch at import
    from mergeengine.io.checkpoint import Checkpoint


class ModelToken(BaseModel):
    """Another token's row of a model: by the token (in the model's own tokenizer) or by its row id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="A step of `models`.")
    token: str | None = Field(None, description="The token whose row is taken (the model's own tokenizer).")
    token_id: int | None = Field(None, ge=0, description="The row taken, by id in the model's own vocabulary.")

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class TokenSource(BaseModel):
    """Where one token's row comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | ModelToken = Field(description="A step of `models` (its row of the token), `zero`, or "
                                                 "`{model, token}` / `{model, token_id}` (another row of a model).")
    force: bool = Field(False, description="Also replace the row of models that have the token.")

    def model(self) -> str | None:
        """The step the row comes from (None for zero)."""
        if isinstance(self.source, ModelToken):
            return self.source.model
        return None if self.source == ZERO else self.source


class VocabAlignStep(StepModel):
    """Lay out a model's vocabulary rows for a union (or the base's) vocabulary."""

    op: Literal["vocab_align"]
    model: str = Field(description="Step id of the model to align (one of `models`).")
    models: list[str] = Field(min_length=1, description="Load steps whose tokenizers form the vocabulary, base first.")
    source: str = Field("union", description="union: every model's tokens; base: the base's; a step of `models`: "
                                              "that model's tokenizer.")
    tokens: dict[str, TokenSource] = Field(default_factory=dict, description="Per-token row sources (a token the "
                                                                             "output tokenizer lacks is added).")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Round the row count up to a multiple of this.")
    fill_from: list[str] | None = Field(None, min_length=1, description="Steps of `models` whose rows fill a row "
                                        "the model lacks: the models merged (default: `models`).")
    base_first: bool = Field(True, description="A token the first of `fill_from` has takes its row (mergekit's "
                                               "rule with a base model); false: no model is preferred.")

    def fill(self) -> list[str]:
        """The models whose rows fill missing rows."""
        return list(self.fill_from or self.models)

    def row_models(self) -> list[str]:
        """The models whose vocabulary rows the step reads, in input order (after the model itself)."""
        named = [m for m in (t.model() for t in self.tokens.values()) if m is not None]
        return list(dict.fromkeys([*self.fill(), *named]))


@register
class VocabAlignOp(Op):
    """Per vocabulary tensor: the model's rows permuted, missing ones filled by the rule; others unchanged."""

    name = "vocab_align"
    Step = VocabAlignStep
    step: VocabAlignStep

    def references(self) -> dict[str, list[str]]:
        return {"model": [self.step.model], "models": list(self.step.models)}

    def infer_kind(self, kinds: Mapping[str, StepKind]) -> tuple[StepKind | None, list[tuple[str, str]]]:
        problems = [("models", f"'{m}' is not a load step") for m in self.step.models if m in kinds and kinds[m].origin != m]
        if self.step.model not in self.step.models:
            problems.append(("model", f"'{self.step.model}' must be one of models"))
        bad = [t for t, s in self.step.tokens.items() if s.model() not in (None, *self.step.models)]
        problems += [("tokens", f"token {t!r}: source must be one of models or 'zero'") for t in bad]
        if self.step.source not in ("union", "base", *self.step.models):
            problems.append(("source", f"'{self.step.source}' is not union, base or one of models"))
        problems += [("fill_from", f"'{m}' must be one of models") for m in self.step.fill() if m not in self.step.models]
        return (StepKind("model", origin=self.step.models[0]) if not problems else None), problems

    def plan_step(self, inputs: PlanInputs) -> StepPlan:
        """The union (or base) vocabulary from the models' tokenizers (read from the load steps'
        checkpoints) and each row's source travel in ``details``; vocabulary tensors take its rows."""
        tokenizers = [load_tokenizer(_folder(inputs.checkpoints[m])) for m in self.step.models]
        metas = inputs.metas[self.step.model]
        vocab_names = tuple(n for n in metas if is_vocab_tensor(n))
        if not vocab_names:
            raise ShapeError("no embedding or lm_head tensor to align", step=self.step.id)
        rows = [inputs.metas[m][vocab_names[0]].shape[0] for m in self.step.models]
        vocab: Vocabulary = build_union(tokenizers[0], tokenizers[1:], rows, self.step.source,
                                        self.step.pad_to_multiple_of, list(self.step.models), tuple(self.step.tokens))
        overrides = {t: (self._override(s, tokenizers, rows), s.force) for t, s in self.step.tokens.items()}
        fill = self.step.fill()
        defaults = default_sources(vocab, fill, fill[0] if self.step.base_first else None, overrides)
        out = {n: TensorMeta((vocab.rows, *m.shape[1:]), torch.float32) if n in vocab_names else m
               for n, m in metas.items()}
        return StepPlan(out, inputs.kinds[self.step.id],
                        details={"vocab_names": vocab_names, "vocab": vocab, "defaults": defaults})

    def _override(self, src: TokenSource, tokenizers: list[Any], rows: list[int]) -> Any:
        """A ``tokens`` source as :func:`default_sources` takes it: a step id, zero, or ``("row", model, id)``."""
        if not isinstance(src.source, ModelToken):
            return src.source
        k = self.step.models.index(src.source.model)
        row = src.source.token_id
        if row is None:
            row = tokenizers[k].get_vocab().get(src.source.token, -1)
            if row < 0:
                raise ShapeError(f"token {src.source.token!r} is not in the tokenizer of '{src.source.model}'",
                                 step=self.step.id)
        if row >= rows[k]:
            raise ShapeError(f"token id {row} is out of range for '{src.source.model}' ({rows[k]} rows)",
                             step=self.step.id)
        return ("row", src.source.model, row)

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        if name not in plan.details["vocab_names"]:
            return [(self.step.model, name)]
        return [(self.step.model, name)] + [(m, name) for m in self.step.row_models()]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if ctx.tensor not in ctx.plan.details["vocab_names"]:
            return inputs[0]
        vocab: Vocabulary = ctx.plan.details["vocab"]
        rows = dict(zip(self.step.row_models(), (t.float() for t in inputs[1:]), strict=True))
        own, perm = inputs[0].float(), vocab.permutations[self.step.model]
        out = torch.zeros((vocab.rows, *own.shape[1:]), dtype=torch.float32)
        index = torch.tensor(perm)
        present = index >= 0
        out[present] = own[index[present]]
        forced = {i for t, i in vocab.tokens.items() if t in self.step.tokens and self.step.tokens[t].force}
        for i, source in ctx.plan.details["defaults"].items():
            if perm[i] < 0 or i in forced:
                out[i] = self._row(vocab, source, i, rows)
        real = sorted(vocab.tokens.values())
        padding = [i for i in range(vocab.rows) if i not in set(real)]
        if padding:
            out[padding] = out[real].mean(0)
        return out

    def _row(self, vocab: Vocabulary, source: Any, i: int, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        if source == ZERO:
            return torch.zeros(next(iter(rows.values())).shape[1:])
        if source[0] == "row":
            return rows[source[1]][source[2]]
        if source[0] == "mean":
            return torch.stack([rows[m][vocab.permutations[m][i]] for m in source[1]]).mean(0)
        j = vocab.permutations[source[0]][i]
        if j < 0:
            raise ShapeError(f"token id {i}: source '{source[0]}' has no such token", step=self.step.id)
        return rows[source[0]][j]

    def write_files(self, plan: StepPlan, dest: Path) -> None:
        """The output tokenizer (union or base), written over the origin's tokenizer files."""
        save_tokenizer(plan.details["vocab"], dest)


def _folder(ckpt: Checkpoint) -> Path:
    folder = getattr(ckpt, "folder", None) or getattr(getattr(ckpt, "base", None), "folder", None)
    if folder is None:
        raise ShapeError(f"{ckpt.source}: vocab_align needs a model folder with tokenizer files")
    return Path(folder)
