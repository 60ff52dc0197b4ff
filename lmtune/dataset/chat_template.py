"""Encoding with the tokenizer's own chat template (``prompt_template=None`` or ``'auto'``).

The whole conversation is rendered once to text with ``tokenizer.apply_chat_template``
and tokenized once, exactly as ``apply_chat_template(tokenize=True)`` does it (no
special tokens added: a chat template writes the BOS text itself where the model
wants one). The trained tokens are then found in the rendered text:

* Where the template renders conversations incrementally (the text of ``messages[:k]``
  with the generation prompt is a prefix of the whole text, and so is the text of
  ``messages[:k + 1]``), an assistant turn is everything between those two prefixes:
  exactly what the model generates after the generation prompt. The trained part ends
  with the turn's last special token (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...), so
  the model learns to stop; a separator after it (ChatML's ``\\n``) is not trained.
* Where a template rewrites earlier turns (a system prompt moved into the last user
  message, reasoning kept only in the last turn ...), the assistant's content is found
  in the text in conversation order, and the trained part runs from it through the
  special token that ends it, if one follows with nothing but whitespace between.

Tokens are labelled when they overlap a trained span (by their character offsets), so
masks are exact for any tokenizer and any template, multi-turn and with system prompts.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset.truncation import cut_is_enough, text_budget, truncate

__all__ = [
    "CHAT_TEMPLATE_KEY",
    "ChatTemplateEncoder",
    "chat_prompt_text",
    "chat_template_end_ids",
    "conversation_to_messages",
    "encode_with_chat_template",
    "has_chat_template",
    "uses_chat_template",
]

# Set on every round by ``template_map_fn_factory(None)``: the encoder renders such rows
# with the tokenizer's chat template instead of reading templated text from the rounds.
CHAT_TEMPLATE_KEY = "chat_template"


def uses_chat_template(prompt_template: Any) -> bool:
    """True for the ``prompt_template`` values that mean "the tokenizer's own chat template"."""
    return prompt_template is None or (isinstance(prompt_template, str) and prompt_template == "auto")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _require_chat_template(tokenizer: Any) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"prompt_template=None (or 'auto') renders conversations with the tokenizer's chat template, "
            f"but the tokenizer {name!r} has none: set prompt_template to a PROMPT_TEMPLATE entry "
            f"(for example PROMPT_TEMPLATE.chatml) or give the tokenizer a chat_template")


def conversation_to_messages(conversation: Sequence[dict]) -> tuple[list[dict], list[bool]]:
    """lmtune rounds -> chat messages, and for each assistant message whether it is trained.

    A round's ``system`` becomes a system message before its user message; its
    ``output_with_loss=False`` leaves that answer untrained.
    """
    messages: list[dict] = []
    trained: list[bool] = []
    for turn in conversation:
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn.get("input") or ""})
        messages.append({"role": "assistant", "content": turn.get("output") or ""})
        trained.append(turn.get("output_with_loss") is not False)
    return messages, trained


def chat_prompt_text(tokenizer: Any, text: str, system: str = "") -> str:
    """The generation prompt for one user message (and a system message, when given)."""
    _require_chat_template(tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_template_end_ids(tokenizer: Any) -> list[int]:
    """The marker tokens that end an assistant turn in the tokenizer's chat template
    (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...): generation stops on them."""
    encoder = ChatTemplateEncoder(tokenizer)
    row = encoder([{"input": "Hi", "output": "Hello"}])
    return sorted({i for i, label in zip(row["input_ids"], row["labels"])
                   if label != IGNORE_INDEX and i in encoder.marker_ids})


class ChatTemplateEncoder:
    """Token ids and labels of conversations rendered with ``tokenizer``'s chat template."""

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        _require_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Added tokens (special or not) are the turn markers a template writes.
        self.marker_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder)
        self.budget = text_budget(tokenizer, max_length)  # characters of one message that can reach the sample

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, conversation: Sequence[dict]) -> dict:
        messages, trained = conversation_to_messages(conversation)
        if not messages:
            return {"input_ids": [], "labels": [], "length": 0}
        return truncate(self._encode(messages, trained), self.max_length)

    def _tokenize(self, text: str):
        try:
            return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ConfigError("prompt_template=None (or 'auto') needs a fast tokenizer, one that reports token "
                              "offsets: load it with use_fast=True, or set a PROMPT_TEMPLATE entry") from None

    def _encode(self, messages: list[dict], trained: list[bool]) -> dict:
        # The whole conversation is rendered (string work, whatever the template does to the content), but a
        # text far longer than max_length is tokenized only as far as the sample can reach (``truncation``).
        text = self.render(messages)
        enc = None
        if self.budget is not None and len(text) > self.budget:
            enc = self._tokenize(text[: self.budget])
            if not cut_is_enough(len(enc["input_ids"]), self.max_length):
                enc = None
        if enc is None:
            enc = self._tokenize(text)
        ids = list(enc["input_ids"])
        starts = [a for a, _ in enc["offset_mapping"]]
        ends = [b for _, b in enc["offset_mapping"]]
        labels = [IGNORE_INDEX] * len(ids)
        for (start, content_end, turn_end), train in zip(self._assistant_spans(messages, text), trained):
            if train:
                for i in self._trained_tokens(ids, starts, ends, text, start, content_end, turn_end):
                    labels[i] = ids[i]
        return {"input_ids": ids, "labels": labels, "length": len(ids)}

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int, int | None]]:
        """Per assistant message: (start, end of its content, end of its turn or None) in ``text``."""
        spans: list[tuple[int, int, int | None]] = []
        cursor = 0
        for k, message in enumerate(messages):
            content = str(message.get("content") or "").strip()
            if message["role"] == "system":
                continue  # templates move system text around; it never bounds an assistant turn
            if message["role"] != "assistant":
                found = text.find(content, cursor)
                if found >= 0:
                    cursor = found + len(content)
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True) if k else ""
            if prompt and text.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
            else:
                start = text.find(content, cursor)
                if start < 0:
                    raise ConfigError(
                        f"the chat template does not write assistant message {k} as given "
                        f"({content[:60]!r}), so its trained tokens cannot be found: use a PROMPT_TEMPLATE "
                        f"entry for this model instead of prompt_template=None")
            found = text.find(content, start)
            done = text if k == len(messages) - 1 else self.render(messages[: k + 1])
            turn_end = len(done) if text.startswith(done) and len(done) > start else None
            if found < 0:
                if turn_end is None:
                    raise ConfigError(f"the chat template rewrites assistant message {k}; its trained tokens "
                                      f"cannot be found: use a PROMPT_TEMPLATE entry for this model")
                content_end = turn_end
            else:
                content_end = found + len(content)
            spans.append((start, content_end, turn_end))
            cursor = content_end
        return spans

    def _trained_tokens(self, ids: list[int], starts: list[int], ends: list[int], text: str,
                        start: int, content_end: int, turn_end: int | None) -> range:
        """Indices of the tokens overlapping the content, plus the end-of-turn marker after it."""
        first = bisect.bisect_right(ends, start)  # first token ending after `start`
        i = first
        while i < len(ids) and starts[i] < content_end:
            i += 1
        stop = i  # tokens first..stop-1 overlap the content
        if turn_end is not None:
            # Train through the last marker token of the turn's own text.
            j = i
            while j < len(ids) and starts[j] < turn_end:
                if ids[j] in self.marker_ids:
                    stop = j + 1
                j += 1
        else:
            # Train through the first marker token after the content, if only whitespace comes before it.
            j = i
            while j < len(ids) and not text[starts[j]:ends[j]].strip() and ids[j] not in self.marker_ids:
                j += 1
            if j < len(ids) and ids[j] in self.marker_ids:
                stop = j + 1
        return range(first, max(first, stop))


def encode_with_chat_template(tokenizer: Any, conversation: Sequence[dict], max_length: int | None) -> dict:
    """``input_ids``, ``labels`` and ``length`` of ``conversation`` rendered by the tokenizer's chat template.

    The ids equal ``tokenizer.apply_chat_template(messages, tokenize=True)``; the labels
    are the ids of the assistant turns (each with the marker that ends it) and
    ``IGNORE_INDEX`` elsewhere. Rows longer than ``max_length`` are cut (and say
    ``truncated: True``).
    """
    return ChatTemplateEncoder(tokenizer, max_length)(conversation)
