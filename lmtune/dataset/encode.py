"""Conversation -> token ids and labels.

Each round's prompt (the templated input) and answer are tokenized separately,
so the prompt tokens are exactly what the model sees at inference, where
generation starts right after the prompt. Only answers (with their suffix and,
when the template asks for it, the EOS token) carry labels. Labels are set by
position, never by token id, so an EOS that is also the pad token stays trained.

Rows marked by ``template_map_fn_factory(None)`` are rendered with the tokenizer's
own chat template instead (``lmtune.dataset.chat_template``).
"""

from __future__ import annotations

from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset.chat_template import CHAT_TEMPLATE_KEY, ChatTemplateEncoder
from lmtune.dataset.truncation import cut_is_enough, text_budget, truncate


def tokenizer_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before every encoding: its BOS token, a longer prefix (ChatGLM's
    ``[gMASK] sop``, which XTuner writes too), or nothing."""
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(ids) - len(bare) + 1):
        if ids[start:start + len(bare)] == bare:
            return ids[:start]
    # the text itself encodes differently with the special tokens (a prefix space...): BOS, if it leads
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] == [bos] else []


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer itself starts every encoding with its BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer_prefix(tokenizer)[:1] == [bos]


class ConversationEncoder:
    """Turns ``{'conversation': [...]}`` rows into ``input_ids``, ``labels`` and ``length``
    (and ``truncated: True`` when the row was cut to ``max_length``)."""

    def __init__(self, tokenizer, max_length: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = tokenizer_prefix(tokenizer)  # BOS, or a longer prefix (ChatGLM's [gMASK] sop)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._cache: dict[str, tuple[int, ...]] = {}
        self._chat_encoder: ChatTemplateEncoder | None = None
        self.budget = text_budget(tokenizer, max_length)  # characters of one text that can reach the sample

    def _encode(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        if self.budget is not None and len(text) > self.budget:  # far longer than max_length: cut first
            ids = tuple(self.tokenizer.encode(text[:self.budget], add_special_tokens=False))
            if cut_is_enough(len(ids), self.max_length):
                return ids
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            ids = self._cache[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return ids

    def prefetch(self, rows: list[dict]) -> None:
        """Tokenize every text of a batch of rows in one call, through the tokenizer's parallel batch path;
        the rows' encoding then only assembles ids. The result is the same as encoding text by text."""
        texts = {turn.get(key) or "" for row in rows for turn in row.get("conversation") or []
                 if not turn.get(CHAT_TEMPLATE_KEY) for key in ("input", "output", "sep")}
        todo = [t for t in texts if t and t not in self._cache and (self.budget is None or len(t) <= self.budget)]
        if not todo:
            return
        if len(self._cache) + len(todo) > 100_000:
            self._cache.clear()
        encoded = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
        self._cache.update(zip(todo, map(tuple, encoded)))

    def __call__(self, example: dict) -> dict:
        conversation = example["conversation"]
        if conversation and conversation[0].get(CHAT_TEMPLATE_KEY):
            if self._chat_encoder is None:
                self._chat_encoder = ChatTemplateEncoder(self.tokenizer, self.max_length)
            return self._chat_encoder(conversation)
        input_ids: list[int] = []
        labels: list[int] = []
        for index, turn in enumerate(conversation):
            if index > 0:  # the previous round's SEP goes between rounds only, never after the last
                sep = self._encode(conversation[index - 1].get("sep") or "")
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
        if self.bos and input_ids[:len(self.bos)] != self.bos:  # a template that writes it itself gets no second one
            input_ids, labels = self.bos + input_ids, [IGNORE_INDEX] * len(self.bos) + labels
        return truncate({"input_ids": input_ids, "labels": labels, "length": len(input_ids)}, self.max_length)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a generation prompt, with BOS (or the tokenizer's longer prefix) exactly as in training."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    prefix = tokenizer_prefix(tokenizer)
    if prefix and ids[:len(prefix)] != prefix:
        ids = prefix + ids
    return ids
