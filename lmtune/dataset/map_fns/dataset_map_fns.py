"""Map functions: one source format in, lmtune's conversation format out.

The conversation format is ``{'conversation': [{'system': str, 'input': str,
'output': str}, ...]}``: one dict per round. A map function returns an empty
conversation for a row that must be dropped.
"""

from __future__ import annotations

import re

from lmtune.config.errors import ConfigError
from lmtune.utils.templates import SYSTEM_TEMPLATE


def _require(example: dict, key: str, fmt: str):
    # A row of a file that lacks a field comes out of Arrow with that field set to None.
    if example.get(key) is None:
        raise ConfigError(
            f"a row has no {key!r} field, which {fmt} needs (row fields: {sorted(example)}); "
            "choose the dataset_map_fn that matches your data's format"
        )
    return example[key]


def alpaca_map_fn(example: dict) -> dict:
    """Alpaca: ``instruction`` (+ optional ``input``) -> ``output``; ``<nooutput>`` rows dropped."""
    output = _require(example, "output", "alpaca_map_fn")
    if output.strip() == "<nooutput>":
        return {"conversation": []}
    instruction = _require(example, "instruction", "alpaca_map_fn")
    extra = (example.get("input") or "").strip()
    text = f"{instruction}\n{extra}" if extra else instruction
    return {"conversation": [{"system": SYSTEM_TEMPLATE.alpaca, "input": text, "output": output}]}


def alpaca_zh_map_fn(example: dict) -> dict:
    """Chinese alpaca (``instruction_zh``/``input_zh``/``output_zh``), same rules as alpaca."""
    mapped = {"instruction": _require(example, "instruction_zh", "alpaca_zh_map_fn"),
              "input": example.get("input_zh", ""),
              "output": _require(example, "output_zh", "alpaca_zh_map_fn")}
    return alpaca_map_fn(mapped)


_OASST1_TURN = re.compile(r"###\s*(Human|Assistant):")


def oasst1_map_fn(example: dict) -> dict:
    """openassistant-guanaco text: ``### Human: ...### Assistant: ...``, multi-turn.

    A trailing human turn without an answer is dropped.
    """
    text = _require(example, "text", "oasst1_map_fn")
    pieces = _OASST1_TURN.split(text)
    turns = [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces) - 1, 2)]
    conversation = []
    pending = None
    for role, content in turns:
        if role == "Human":
            pending = content if pending is None else f"{pending}\n{content}"
        elif pending is not None:
            conversation.append({"input": pending, "output": content})
            pending = None
    return {"conversation": conversation}


def openai_map_fn(example: dict) -> dict:
    """OpenAI ``messages``: system/user/assistant, multi-turn.

    An assistant message may carry ``loss: false`` to keep it out of the loss.
    """
    messages = _require(example, "messages", "openai_map_fn")
    conversation = []
    system, pending = "", None
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "system":
            system = content
        elif role == "user":
            pending = content if pending is None else f"{pending}\n{content}"
        elif role == "assistant" and pending is not None:
            turn = {"input": pending, "output": content}
            if system:
                turn["system"] = system
                system = ""
            if message.get("loss") is False:
                turn["output_with_loss"] = False
            conversation.append(turn)
            pending = None
    return {"conversation": conversation}


def default_map_fn(example: dict) -> dict:
    """Rows already of the form ``{'input': ..., 'output': ...}`` (``system`` optional)."""
    turn = {"input": _require(example, "input", "default_map_fn"),
            "output": _require(example, "output", "default_map_fn")}
    if example.get("system"):
        turn["system"] = example["system"]
    return {"conversation": [turn]}


def pretrain_map_fn(example: dict) -> dict:
    """Plain text for continued pre-training: every token is trained, no template, no EOS per turn."""
    return {"conversation": [{"input": "", "output": _require(example, "text", "pretrain_map_fn").strip(),
                              "need_eos_token": False}]}
