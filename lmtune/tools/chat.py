"""``lmtune chat``: talk to a (fine-tuned) model with the template it was trained with.

The conversation is a ``ChatSession`` (``lmtune.engine.chat``), the same one the evaluate-chat hook
uses during training: prompts built exactly as in training, generation cut at the template's stop
words and the EOS. This module loads the model and adapter, picks the template and runs the loop.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtune.core.errors import ConfigError
from lmtune.dataset.chat_template import has_chat_template
from lmtune.dataset.templates import SYSTEM_TEMPLATE
from lmtune.engine.chat import ChatSession
from lmtune.engine.checkpoint.export import EXPORT_INFO, read_export_record

__all__ = ["ChatSession", "add_parser", "default_prompt_template", "interactive", "load_for_chat",
           "recorded_export"]

EXIT_COMMANDS = ("exit", "quit")
RESET_COMMANDS = ("reset", "clear")
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def recorded_export(*dirs: str | Path | None) -> dict:
    """The ``lmtune_export.json`` record of the first of ``dirs`` that has a readable one, or {}."""
    for d in dirs:
        if not d:
            continue
        try:
            record = read_export_record(d)
        except ConfigError:
            continue
        if record is not None:
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

    from lmtune.core.paths import check_model_path
    from lmtune.model import ports

    check_model_path(model, "lmtune chat", "name a model dir, a merged model, or a hub id 'namespace/name'")
    if adapter:
        check_model_path(adapter, "lmtune chat --adapter", "name the directory `lmtune convert pth_to_hf` wrote")
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
                        f"default: the one recorded in {EXPORT_INFO}, else 'auto' when the tokenizer has a "
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
