"""A character-level tokenizer for tiny, deterministic test and benchmark models.

One token per character of a fixed alphabet plus ``<pad> <bos> <eos> <unk>``; the prompt gets a
``<bos>`` prefix. The result is a ``transformers`` fast tokenizer, so a folder it is saved into
loads with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeengine.eval.evaluate import require_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: lowercase letters, digits, space, newline and the punctuation the benchmark tasks use.
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?+-=*>#()'\n"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """Build a character-level ``PreTrainedTokenizerFast``.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the alphabet in order.

    Args:
        alphabet: the characters, each once.

    Returns:
        The tokenizer; ``len(tokenizer)`` is ``4 + len(alphabet)``.

    Raises:
        ValueError: a character appears twice.

    Example:
        >>> tok = build_char_tokenizer("ab ")  # doctest: +SKIP
        >>> tok("ab")["input_ids"]  # doctest: +SKIP
        [1, 4, 5]
    """
    transformers = require_transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
