"""Apply a prompt template to the conversation format."""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import partial

from lmtune.dataset.chat_template import CHAT_TEMPLATE_KEY, uses_chat_template
from lmtune.dataset.templates import get_template


def _has_field(fmt: str, name: str) -> bool:
    return any(field == name for _, field, _, _ in string.Formatter().parse(fmt))


def template_map_fn(example: dict, template: dict) -> dict:
    """Wrap each round's input in the template and append its suffix to the output.

    Adds per round: ``need_eos_token`` (False when the suffix is the EOS) and
    ``sep`` (the text between rounds, never trained). A round's system message is
    rendered with ``SYSTEM`` into INSTRUCTION's ``{system}`` when it has one, and
    before INSTRUCTION otherwise.
    """
    instruction = template["INSTRUCTION"]
    system_inside = _has_field(instruction, "system")
    rounds = []
    for index, turn in enumerate(example.get("conversation") or []):
        turn = dict(turn)
        system = turn.get("system") or ""
        if system and not template.get("SYSTEM"):
            from lmtune.core.device import warn_once

            warn_once("the prompt template has no SYSTEM format, so the rows' system messages are left out of "
                      "the training text (set SYSTEM in the template, or drop the system prompt)")
        system_text = template["SYSTEM"].format(system=system) if system and template.get("SYSTEM") else ""
        if system_inside:
            text = instruction.format(input=turn.get("input", ""), round=index + 1, system=system_text)
        else:
            text = system_text + instruction.format(input=turn.get("input", ""), round=index + 1)
        turn["input"] = text
        turn["output"] = turn.get("output", "") + (template.get("SUFFIX") or "")
        if turn.get("need_eos_token") is None:  # absent, or None where Arrow filled a missing key
            turn["need_eos_token"] = not template.get("SUFFIX_AS_EOS", False)
        turn["sep"] = template.get("SEP") or ""
        rounds.append(turn)
    return {"conversation": rounds}


def chat_template_map_fn(example: dict) -> dict:
    """Mark every round for the tokenizer's own chat template; the text is left as it is.

    ``ConversationEncoder`` renders marked rows with ``tokenizer.apply_chat_template``
    (see ``lmtune.dataset.chat_template``).
    """
    return {"conversation": [dict(turn, **{CHAT_TEMPLATE_KEY: True})
                             for turn in example.get("conversation") or []]}


def template_map_fn_factory(template: dict | str | None = None) -> Callable[[dict], dict]:
    """The map function applying ``template``: a ``PROMPT_TEMPLATE`` entry or its name,
    or None / ``'auto'`` for the tokenizer's own chat template."""
    if uses_chat_template(template):
        return chat_template_map_fn
    return partial(template_map_fn, template=get_template(template))
