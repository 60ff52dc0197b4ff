"""Conversation -> token ids and labels.

Each round's prompt (the templated input) and answer are tokenized separately,
so the prompt tokens are exactly what the model sees at inference, where
generation starts right after the prompt. Only answers (with their suffix and,
when the template asks for it, the EOS token) carry labels.
"""

from __future__ import annotations

from functools import lru_cache

from lmtune.utils.constants import IGNORE_INDEX


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer itself starts every encoding with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


class ConversationEncoder:
    """Turns ``{'conversation': [...]}`` rows into ``input_ids`` and ``labels``."""

    def __init__(self, tokenizer, max_length: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._encode = lru_cache(maxsize=256)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False)) if text else ()

    def __call__(self, example: dict) -> dict:
        input_ids: list[int] = list(self.bos)
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        for index, turn in enumerate(example["conversation"]):
            if index > 0:  # the previous round's SEP goes between rounds only, never after the last
                sep = self._encode(example["conversation"][index - 1].get("sep") or "")
                input_ids += sep
                labels += [IGNORE_INDEX] * len(sep)
            prompt = self._encode(turn.get("input") or "")
            input_ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
            answer = list(self._encode(turn.get("output") or ""))
            # None means "not set" (Arrow fills a key that other rounds have with None)
            if turn.get("need_eos_token") is not False:
                answer += self.eos
            input_ids += answer
            trained = turn.get("output_with_loss") is not False
            labels += answer if trained else [IGNORE_INDEX] * len(answer)
        if self.max_length is not None and len(input_ids) > self.max_length:
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": input_ids, "labels": labels, "length": len(input_ids)}


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a generation prompt, with BOS exactly as in training."""
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    return bos + tokenizer.encode(text, add_special_tokens=False)
