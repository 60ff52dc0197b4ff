"""The one generation path: a chat session that prompts a model exactly as it was trained.

(In the engine, not the model: it builds prompts with the data layer, which the model layer does not import.)

Used by ``lmtune chat`` and by the evaluate-chat hook during training. The prompt of every turn is
the whole conversation so far, built as in training: a ``PROMPT_TEMPLATE`` entry through
``template_map_fn`` and ``ConversationEncoder`` (SYSTEM once, INSTRUCTION per round, earlier answers
with their SUFFIX / EOS, SEP between rounds), or the tokenizer's own chat template with
``add_generation_prompt=True``, or plain text. Generation stops at the template's stop words, the
chat template's end-of-turn marker and the EOS, which are cut from the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lmtune.dataset.chat_template import chat_template_end_ids, has_chat_template
from lmtune.dataset.encode import ConversationEncoder, encode_prompt
from lmtune.dataset.map_fns.template_map_fn import template_map_fn
from lmtune.dataset.templates import get_template


class _StopAwarePrinter:
    """A ``generate`` streamer that passes the answer's text to ``callback`` as it grows,
    never any stop word or any text after one (a possible start of a stop word is held back)."""

    def __init__(self, tokenizer, prompt_len: int, stop_words: list[str], callback: Callable[[str], Any]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_words = [w for w in stop_words if w]
        self.callback = callback
        self.ids: list[int] = []
        self.skipped_prompt = False
        self.printed = 0
        self.stopped = False

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if not self.skipped_prompt:  # generate() first sends the prompt
            self.skipped_prompt = True
            if len(ids) == self.prompt_len:
                return
        self.ids += ids
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = cut_at_stop(text, self.stop_words)
        if cut != text:
            self.stopped = True
            end = len(cut)
        elif final:
            end = len(text)
        else:
            end = len(text) - _held_back(text, self.stop_words)
            if text[:end].endswith("\ufffd"):  # an unfinished multi-byte character
                end -= 1
        if end > self.printed:
            self.callback(text[self.printed:end])
            self.printed = end


class _TokenCounter:
    """A ``generate`` streamer that reports how many tokens have been generated (the prompt excluded)."""

    def __init__(self, prompt_len: int, report: Callable[[int], Any]) -> None:
        self.prompt_len = prompt_len
        self.report = report
        self.seen_prompt = False
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first sends the prompt
            self.seen_prompt = True
            if value.numel() == self.prompt_len:
                return
        self.tokens += value.numel()
        self.report(self.tokens)

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stop_words: Iterable[str]) -> str:
    """``text`` up to its first stop word."""
    end = len(text)
    for word in stop_words:
        if word and (i := text.find(word)) >= 0:
            end = min(end, i)
    return text[:end]


def _held_back(text: str, stop_words: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that starts a stop word."""
    best = 0
    for word in stop_words:
        for n in range(min(len(word) - 1, len(text)), best, -1):
            if text.endswith(word[:n]):
                best = n
                break
    return best


class ChatSession:
    """A multi-turn conversation with ``model``.

    ``prompt_template``: a ``PROMPT_TEMPLATE`` name or dict (prompts built as in training),
    ``'auto'`` for the tokenizer's chat template, or None for plain text (the turns concatenated).
    ``temperature`` 0 decodes greedily.
    """

    def __init__(self, model, tokenizer, prompt_template: Any = None, system: str = "",
                 max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 stop_words: list[str] | None = None, seed: int | None = None,
                 generation_kwargs: dict | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system or ""
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.generation_kwargs = dict(generation_kwargs or {})
        self.seed = seed
        self.use_chat_template = isinstance(prompt_template, str) and prompt_template == "auto"
        if self.use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("prompt_template='auto' needs a tokenizer with a chat template; "
                             "give a PROMPT_TEMPLATE name or None for plain text")
        self.template = None if self.use_chat_template or prompt_template is None else get_template(prompt_template)
        stops = list(stop_words or [])
        if self.template is not None:
            stops += [w for w in self.template.get("STOP_WORDS") or [] if w not in stops]
        end_ids: list[int] = []
        if self.use_chat_template:
            end_ids = chat_template_end_ids(tokenizer)
            stops += [w for w in tokenizer.convert_ids_to_tokens(end_ids) if w not in stops]
        self.stop_words = stops
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        unk = tokenizer.unk_token_id
        for word in stops:  # stop words that are single tokens stop generation by id
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1 and ids[0] != unk:
                eos.append(ids[0])
        self.eos_ids = sorted(set(eos + end_ids))
        self.trim_words = stops + ([tokenizer.eos_token] if tokenizer.eos_token else [])
        self.history: list[tuple[str, str]] = []
        self.last_generated_ids: list[int] = []
        self.last_new_tokens = 0  # tokens the last answer generated, its EOS included
        if seed is not None:
            from transformers import set_seed

            set_seed(seed)

    def reset(self) -> None:
        """Forget the conversation so far."""
        self.history = []

    def _conversation(self, text: str) -> list[dict]:
        rounds = [{"input": q, "output": a} for q, a in self.history] + [{"input": text, "output": ""}]
        if self.system:
            rounds[0]["system"] = self.system
        return rounds

    def prompt_text(self, text: str) -> str:
        """The whole prompt, as text, for the next user message ``text``."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(self._messages(text), tokenize=False,
                                                      add_generation_prompt=True)
        if self.template is None:
            return self.system + "".join(q + a for q, a in self.history) + text
        return self.tokenizer.decode(self.prompt_ids(text), skip_special_tokens=False)

    def _messages(self, text: str) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in self.history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the prompt for the next user message ``text``, tokenized as in training."""
        if self.use_chat_template:
            # as apply_chat_template(tokenize=True): the template writes any BOS itself
            return self.tokenizer.encode(self.prompt_text(text), add_special_tokens=False)
        if self.template is None:
            return encode_prompt(self.tokenizer, self.prompt_text(text))
        rounds = template_map_fn({"conversation": self._conversation(text)}, self.template)["conversation"]
        rounds[-1]["output"] = ""  # the model writes the answer (and its suffix) itself
        rounds[-1]["need_eos_token"] = False
        return ConversationEncoder(self.tokenizer, None)({"conversation": rounds})["input_ids"]

    def _generate_kwargs(self) -> dict:
        pad = self.tokenizer.pad_token_id
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, use_cache=True,
                                      eos_token_id=self.eos_ids or None,
                                      pad_token_id=pad if pad is not None else (self.eos_ids or [0])[0])
        if self.temperature and self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        multi_token_stops = [w for w in self.stop_words
                             if len(self.tokenizer.encode(w, add_special_tokens=False)) > 1]
        if multi_token_stops:
            kwargs.update(stop_strings=multi_token_stops, tokenizer=self.tokenizer)
        kwargs.update(self.generation_kwargs)
        return kwargs

    def chat(self, text: str, stream: Callable[[str], Any] | None = None,
             progress: Callable[[int], Any] | None = None, synced_gpus: bool = False,
             context: Callable[[], contextlib.AbstractContextManager] | None = None) -> str:
        """The model's answer to ``text`` (stop words and EOS cut), remembered in the history.

        ``stream``, when given, receives the answer's text piece by piece as it is generated;
        ``progress`` the number of tokens generated so far, after each one (neither with beam search).
        ``synced_gpus``: every rank takes part in each forward until all are done (sharded weights).
        ``context``: what ``generate`` runs inside (the training's autocast, for example).
        """
        ids = self.prompt_ids(text)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        kwargs = self._generate_kwargs()
        if synced_gpus:
            kwargs["synced_gpus"] = True
        if int(kwargs.get("num_beams", 1)) == 1:  # generate() streams no beams
            if stream is not None:
                kwargs["streamer"] = _StopAwarePrinter(self.tokenizer, len(ids), self.trim_words, stream)
            elif progress is not None:
                kwargs["streamer"] = _TokenCounter(len(ids), progress)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), (context or contextlib.nullcontext)():
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        finally:
            self.model.train(was_training)
        generated = out[0, len(ids):].tolist()
        self.last_new_tokens = len(generated)
        while generated and generated[-1] in self.eos_ids:
            generated.pop()
        self.last_generated_ids = generated
        answer = cut_at_stop(self.tokenizer.decode(generated, skip_special_tokens=False), self.trim_words)
        self.history.append((text, answer))
        return answer


__all__ = ["ChatSession", "cut_at_stop"]
