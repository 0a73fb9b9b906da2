"""A union vocabulary over several models' tokenizers, and where each output token's embedding row comes from.

Built with transformers' fast tokenizers (the ``tokenizers`` library): the output tokenizer is
the base model's with every token of the other tokenizers that it lacks appended (regular tokens
first, then added/special tokens), as mergekit's ``tokenizer_source: union`` builds it. Each
model then gets a permutation: output token id -> its own row, or -1 where it lacks the token.

The output tokenizer may also be one model's own (``source: <model>``), as mergekit's
``tokenizer_source: <model>`` takes it. Rows a model lacks are filled by mergekit's rule
(:func:`default_sources`) over the models merged: from the only one that has the token; from the
base when it has it; else the mean of those that have it; a token none has is zero. A ``tokens``
entry names the source itself: a model (its row of the token), another token's row of a model, or
zero (``force`` also replaces the rows of models that have the token); a token it names that the
output tokenizer lacks is added. Rows added by ``pad_to_multiple_of`` take the mean of the real
rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeengine.errors import ModelError

ZERO = "zero"  # a token source: a zero row


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and, per model, output token id -> the model's row (-1: absent)."""

    tokenizer: Any
    tokens: dict[str, int]
    permutations: dict[str, list[int]]
    rows: int


def load_tokenizer(folder: Path) -> Any:
    """A fast tokenizer from a model folder's tokenizer files.

    Raises:
        ModelError: no tokenizer.json (the union needs fast tokenizers) or transformers missing.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelError("tokenizer_source: union needs transformers (pip install 'mergeengine[eval]')") from None
    if not (folder / "tokenizer.json").is_file():
        raise ModelError("tokenizer_source: union needs a fast tokenizer (tokenizer.json)", file=str(folder))
    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def _usable(tokenizer: Any, rows: int) -> dict[str, int]:
    """The tokens whose ids have an embedding row (ids >= rows are padding of the tokenizer)."""
    return {t: i for t, i in tokenizer.get_vocab().items() if i < rows}


def build_union(base: Any, others: list[Any], rows: list[int], source: str, pad_to_multiple_of: int | None,
                names: list[str], extra_tokens: tuple[str, ...] = ()) -> Vocabulary:
    """The output tokenizer and each model's permutation.

    Args:
        base: the base model's tokenizer (first of ``names``).
        others: the other models' tokenizers, in ``names[1:]`` order.
        rows: each model's embedding rows (``names`` order).
        source: ``union`` (base plus what the others add), ``base`` (the base's tokens only), or one
            of ``names`` (that model's tokenizer as it is, as mergekit's ``tokenizer_source: <model>``).
        pad_to_multiple_of: round the output rows up to a multiple of this.
        names: the models' step ids, base first.
        extra_tokens: tokens added to the output tokenizer where it lacks them (mergekit adds every
            token of ``tokenizer.tokens``).
    """
    import copy

    tokenizers = [base, *others]
    out = copy.deepcopy(tokenizers[names.index(source)] if source in names else base)
    if source == "union":
        _add_union(out, others, rows[1:])
    missing = [t for t in dict.fromkeys(extra_tokens) if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    tokens = out.get_vocab()
    size = max(tokens.values()) + 1
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    perms = {}
    for name, tok, r in zip(names, tokenizers, rows, strict=True):
        own = _usable(tok, r)
        perm = [-1] * size
        for t, i in tokens.items():
            perm[i] = own.get(t, -1)
        perms[name] = perm
    return Vocabulary(out, tokens, perms, size)


def _add_union(out: Any, others: list[Any], rows: list[int]) -> None:
    """Append to ``out`` the others' regular tokens it lacks (in model, then id order), then their added tokens."""
    have = set(out.get_vocab())
    added = {a.content for tok in others for a in tok.added_tokens_decoder.values()}
    for tok, r in zip(others, rows, strict=True):
        for t, _ in sorted(_usable(tok, r).items(), key=lambda kv: kv[1]):
            if t not in have and t not in added:
                out.add_tokens([t])
                have.add(t)
    for tok in others:
        for info in tok.added_tokens_decoder.values():
            if info.content not in have:
                out.add_tokens([info])
                have.add(info.content)


def default_sources(vocab: Vocabulary, fill: list[str], base: str | None,
                    overrides: dict[str, tuple[Any, bool]]) -> dict[int, Any]:
    """For each output token id some model of ``fill`` lacks (or that is forced): ``(model,)`` (its row of
    the token), ``("row", model, id)`` (a given row of the model), ``ZERO``, or ``("mean", [models])``.

    Args:
        vocab: the union.
        fill: the models whose rows fill a missing row (the models merged).
        base: the model whose row a token takes when it has it (None: no model is preferred).
        overrides: token -> (source, force); a source is a step id, ``zero`` or ``("row", model, id)``.
    """
    out: dict[int, Any] = {}
    for token, i in vocab.tokens.items():
        having = [m for m in fill if vocab.permutations[m][i] >= 0]
        override = overrides.get(token)
        if override is not None:
            if override[1] or len(having) < len(fill):
                out[i] = override[0] if override[0] == ZERO or isinstance(override[0], tuple) else (override[0],)
            continue
        if len(having) == len(fill):
            continue
        if len(having) == 1:
            out[i] = (having[0],)
        elif not having:
            out[i] = ZERO
        elif base in having:
            out[i] = (base,)
        else:
            out[i] = ("mean", having)
    return out


def save_tokenizer(vocab: Vocabulary, dest: Path) -> None:
    """Write the output tokenizer's files into ``dest`` (a chat template already there is kept)."""
    cfg_path = dest / "tokenizer_config.json"
    template = None
    if cfg_path.is_file():
        template = json.loads(cfg_path.read_text()).get("chat_template")
    vocab.tokenizer.save_pretrained(str(dest))
    if template is not None:
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
