"""The one truncation of a tokenized sample, used by every encoder, the row stages and pre-tokenized data;
and the cut of a text far longer than ``max_length`` before it is tokenized.

A text of ``(max_length + CUT_MARGIN_TOKENS) * L`` characters, where ``L`` is the longest token of the
vocabulary in characters, holds at least ``max_length + CUT_MARGIN_TOKENS`` tokens. Cutting a longer text
there changes only the tokens next to the cut, far past ``max_length``, so the truncated sample is the same
while tokenizing costs time and memory in proportion to ``max_length`` (a 50 MB row is read as 0.3 MB at
``max_length=128``). Where a tokenizer's normalizer drops characters and the cut text comes out short,
the whole text is tokenized after all (``cut_is_enough``).
"""

from __future__ import annotations

CUT_MARGIN_TOKENS = 64


def text_budget(tokenizer, max_length: int | None) -> int | None:
    """How many characters of one text can matter to a sample of ``max_length`` tokens (None: all)."""
    if max_length is None:
        return None
    try:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return (max_length + CUT_MARGIN_TOKENS) * max(longest, 1)


def cut_is_enough(num_tokens: int, max_length: int) -> bool:
    """Whether a cut text's tokens reach far enough past ``max_length`` for the cut not to matter."""
    return num_tokens >= max_length + CUT_MARGIN_TOKENS


def truncate(row: dict, max_length: int | None) -> dict:
    """``row`` (``input_ids``, ``labels``, ``length``) cut to its first ``max_length`` tokens; a cut row says
    so with ``truncated: True``. A row that fits is returned as it is."""
    if max_length is None or row["length"] <= max_length:
        return row
    return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length],
            "length": max_length, "truncated": True}


__all__ = ["CUT_MARGIN_TOKENS", "cut_is_enough", "text_budget", "truncate"]
