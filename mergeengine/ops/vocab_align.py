"""``vocab_align``: a model's embedding and lm_head rows laid out for a union vocabulary.

```yaml
- {id: math_u, op: vocab_align, model: math, models: [base, math, code], source: union}
```

``models`` are the models whose tokenizers form the vocabulary, the base first (see
:mod:`mergeengine.io.vocabulary` for the rule each missing row follows). Every model of a merge
is aligned by its own step with the same ``models``, so their rows line up and the merge runs
on them as usual; a save downstream writes the union tokenizer, and config.json's
``vocab_size`` is the aligned row count. Tensors other than embeddings and lm_head pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

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


class TokenSource(BaseModel):
    """Where one token's row comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="A step of `models`, or `zero`.")
    force: bool = Field(False, description="Also replace the row of models that have the token.")


class VocabAlignStep(StepModel):
    """Lay out a model's vocabulary rows for a union (or the base's) vocabulary."""

    op: Literal["vocab_align"]
    model: str = Field(description="Step id of the model to align (one of `models`).")
    models: list[str] = Field(min_length=1, description="Load steps whose tokenizers form the vocabulary, base first.")
    source: Literal["union", "base"] = Field("union", description="union: every model's tokens; base: the base's.")
    tokens: dict[str, TokenSource] = Field(default_factory=dict, description="Per-token row sources.")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Round the row count up to a multiple of this.")


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
        bad = [t for t, s in self.step.tokens.items() if s.source not in (ZERO, *self.step.models)]
        problems += [("tokens", f"token {t!r}: source must be one of models or 'zero'") for t in bad]
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
                                        self.step.pad_to_multiple_of, list(self.step.models))
        overrides = {t: (s.source, s.force) for t, s in self.step.tokens.items()}
        defaults = default_sources(vocab, self.step.models[0], overrides)
        out = {n: TensorMeta((vocab.rows, *m.shape[1:]), torch.float32) if n in vocab_names else m
               for n, m in metas.items()}
        return StepPlan(out, inputs.kinds[self.step.id],
                        details={"vocab_names": vocab_names, "vocab": vocab, "defaults": defaults})

    def sources(self, name: str, plan: StepPlan) -> list[tuple[str, str]]:
        if name not in plan.details["vocab_names"]:
            return [(self.step.model, name)]
        return [(self.step.model, name)] + [(m, name) for m in self.step.models]

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if ctx.tensor not in ctx.plan.details["vocab_names"]:
            return inputs[0]
        vocab: Vocabulary = ctx.plan.details["vocab"]
        rows = dict(zip(self.step.models, (t.float() for t in inputs[1:]), strict=True))
        own, perm = rows[self.step.model], vocab.permutations[self.step.model]
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
            return torch.zeros(rows[self.step.model].shape[1:])
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
