"""``lmtune chat``: talk to a (fine-tuned) model with the template it was trained with.

The prompt of every turn is the whole conversation so far, built exactly as in
training: a ``PROMPT_TEMPLATE`` entry through ``template_map_fn`` and
``ConversationEncoder`` (SYSTEM once, INSTRUCTION per round, earlier answers with
their SUFFIX / EOS, SEP between rounds), or the tokenizer's own chat template with
``add_generation_prompt=True``, or plain text. Generation stops at the template's
stop words and the EOS, which are cut from the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmtune.dataset.chat_template import chat_template_end_ids, has_chat_template
from lmtune.dataset.encode import ConversationEncoder, encode_prompt
from lmtune.dataset.map_fns.template_map_fn import template_map_fn
from lmtune.dataset.templates import SYSTEM_TEMPLATE, get_template

__all__ = ["ChatSession", "add_parser", "default_prompt_template", "interactive", "load_for_chat",
           "recorded_export"]

EXPORT_FILE = "lmtune_export.json"
EXIT_COMMANDS = ("exit", "quit")
RESET_COMMANDS = ("reset", "clear")
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
        cut = _cut_at_stop(text, self.stop_words)
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


def _cut_at_stop(text: str, stop_words: Iterable[str]) -> str:
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

    def chat(self, text: str, stream: Callable[[str], Any] | None = None) -> str:
        """The model's answer to ``text`` (stop words and EOS cut), remembered in the history.

        ``stream``, when given, receives the answer's text piece by piece as it is generated.
        """
        import torch

        ids = self.prompt_ids(text)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        kwargs = self._generate_kwargs()
        if stream is not None:
            kwargs["streamer"] = _StopAwarePrinter(self.tokenizer, len(ids), self.trim_words, stream)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        finally:
            self.model.train(was_training)
        generated = out[0, len(ids):].tolist()
        while generated and generated[-1] in self.eos_ids:
            generated.pop()
        self.last_generated_ids = generated
        answer = _cut_at_stop(self.tokenizer.decode(generated, skip_special_tokens=False), self.trim_words)
        self.history.append((text, answer))
        return answer


def recorded_export(*dirs: str | Path | None) -> dict:
    """The ``lmtune_export.json`` record of the first of ``dirs`` that has one, or {}."""
    for d in dirs:
        if d and (path := Path(d) / EXPORT_FILE).is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                return record
    return {}


def default_prompt_template(tokenizer, *dirs: str | Path | None) -> Any:
    """The template recorded next to the adapter/model, else ``'auto'`` when the tokenizer
    has a chat template, else None (plain text)."""
    recorded = recorded_export(*dirs).get("prompt_template")
    if recorded:
        return recorded
    return "auto" if has_chat_template(tokenizer) else None


def load_for_chat(model: str, adapter: str | None = None, bits: int | None = None, torch_dtype: str = "auto",
                  trust_remote_code: bool = False):
    """``(model, tokenizer)``: the model (with the PEFT ``adapter`` and 4/8-bit quantization when
    asked), and the tokenizer of the adapter dir when it has one, else of the model dir. A hub-code
    family lmtune ports loads natively; another repository's own code runs only with
    ``trust_remote_code``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.model import ports

    dtype = DTYPES.get(torch_dtype, torch_dtype)
    if dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if bits is not None:
        from transformers import BitsAndBytesConfig

        if bits == 4:
            compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute)
        elif bits == 8:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise ValueError(f"bits must be 4 or 8, not {bits!r}")
        kwargs["device_map"] = "auto"
    llm = ports.from_pretrained(AutoModelForCausalLM, model, trust_remote_code=trust_remote_code, **kwargs)
    if adapter:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, adapter)
    if bits is None and torch.cuda.is_available():
        llm = llm.cuda()
    llm.eval()
    tok_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    tokenizer = ports.from_pretrained(AutoTokenizer, tok_dir, trust_remote_code=trust_remote_code)
    return llm, tokenizer


def interactive(session: ChatSession, input_fn: Callable[[str], str] = input, stream: bool = True,
                out=None) -> int:
    """The ``>>>`` loop: ``exit``/``quit`` or Ctrl-D ends it, ``reset``/``clear`` forgets the history."""
    out = out or sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        try:
            text = input_fn(">>> ")
        except EOFError:
            write("\n")
            return 0
        command = text.strip().lower()
        if not command:
            continue
        if command in EXIT_COMMANDS:
            return 0
        if command in RESET_COMMANDS:
            session.reset()
            write("(history cleared)\n")
            continue
        if stream:
            session.chat(text, stream=write)
            write("\n")
        else:
            write(session.chat(text) + "\n")


def _read_line(prompt: str) -> str:
    return input(prompt)


def _system(args) -> str:
    if args.system_template:
        try:
            return SYSTEM_TEMPLATE[args.system_template]
        except KeyError:
            raise ValueError(f"unknown system template {args.system_template!r}; known: "
                             f"{', '.join(SYSTEM_TEMPLATE)}") from None
    return args.system or ""


def _chat(args) -> int:
    model, tokenizer = load_for_chat(args.model, args.adapter, args.bits, args.torch_dtype, args.trust_remote_code)
    template: Any = args.prompt_template
    if template is None:
        template = default_prompt_template(tokenizer, args.adapter, args.model)
    elif template.lower() == "none":
        template = None
    system = _system(args) if args.system is not None or args.system_template else \
        recorded_export(args.adapter, args.model).get("system") or ""
    session = ChatSession(model, tokenizer, prompt_template=template, system=system,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop_words=args.stop_words, seed=args.seed)
    prompts = list(args.prompt or [])
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        if not prompts:
            return 0
    if prompts:
        for text in prompts:
            if args.separate:
                session.reset()
            print(session.chat(text), flush=True)
        return 0
    return interactive(session, input_fn=_read_line, stream=not args.no_streamer)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``chat`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("chat", help="chat with a model (and adapter) using its training template")
    p.add_argument("model", help="model name or directory")
    p.add_argument("--adapter", help="PEFT adapter directory to load on top of the model")
    p.add_argument("--prompt-template", metavar="NAME",
                   help="PROMPT_TEMPLATE name, 'auto' (the tokenizer's chat template) or 'none' (plain text); "
                        f"default: the one recorded in {EXPORT_FILE}, else 'auto' when the tokenizer has a "
                        "chat template, else plain text")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", help="system prompt")
    system.add_argument("--system-template", metavar="NAME", help="SYSTEM_TEMPLATE name")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized (bitsandbytes)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (not needed for the hub-code families lmtune "
                        "runs natively)")
    p.add_argument("--torch-dtype", choices=list(DTYPES), default="auto")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop-words", nargs="+", default=[], metavar="WORD", help="extra stop words")
    p.add_argument("--no-streamer", action="store_true", help="print each answer when it is complete")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="answer TEXT and exit; repeated, the prompts are the turns of one conversation (each "
                        "answer sees the earlier ones) unless --separate is given. Without it, prompts are read "
                        "from stdin, one a line, when stdin is not a terminal")
    p.add_argument("--separate", action="store_true",
                   help="answer each --prompt (or stdin line) in a conversation of its own")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=_chat)
    return p
