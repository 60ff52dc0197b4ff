"""Does a prompt template render what the tokenizer's own chat template renders?

A run trains with its ``prompt_template``; where the tokenizer ships a chat template, the model will
be chatted with through that one. When the two disagree (an XTuner template, which lmtune keeps exact
on the ``xtuner.*`` import path, or a template meant for another model), the run says so once and names
lmtune's templates that do match, or ``prompt_template=None``, which renders the chat template itself.

The comparison tokenizes a probe conversation (a system message and three rounds) both ways. The
token ids must be equal, except that the chat template may end with whitespace after the final turn
(ChatML's ``\\n``), which a training template leaves out.
"""

from __future__ import annotations

import copy
from typing import Any

from lmtune.core.device import warn_once

PROBE = [
    {"system": "You are terse.", "input": "Name a colour.", "output": "Blue."},
    {"input": "Another one?", "output": "Red."},
    {"input": "And a third?", "output": "Green, then."},
]


def _template_ids(tokenizer: Any, template: dict) -> list[int] | None:
    from lmtune.dataset.encode import ConversationEncoder
    from lmtune.dataset.map_fns.template_map_fn import template_map_fn

    try:
        rows = template_map_fn({"conversation": copy.deepcopy(PROBE)}, template=template)
        return list(ConversationEncoder(tokenizer, None)(rows)["input_ids"])
    except Exception:  # noqa: BLE001 - a template that cannot render the probe matches nothing
        return None


def _chat_ids(tokenizer: Any) -> list[int] | None:
    from lmtune.dataset.chat_template import ChatTemplateEncoder

    try:
        return list(ChatTemplateEncoder(tokenizer)(copy.deepcopy(PROBE))["input_ids"])
    except Exception:  # noqa: BLE001 - a chat template that rejects the probe (no system role) is not compared
        return None


def same_rendering(tokenizer: Any, ids: list[int] | None, chat: list[int]) -> bool:
    if ids is None or chat[: len(ids)] != ids:
        return False
    tail = chat[len(ids):]
    return not tail or not tokenizer.decode(tail, skip_special_tokens=False).strip()


def matching_templates(tokenizer: Any, chat: list[int]) -> list[str]:
    """lmtune's templates that render ``chat``; those named like the tokenizer's model first."""
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    model = str(getattr(tokenizer, "name_or_path", "") or "").lower()
    names = [name for name, template in PROMPT_TEMPLATE.items()
             if same_rendering(tokenizer, _template_ids(tokenizer, dict(template)), chat)]
    return sorted(names, key=lambda name: name.split("_")[0] not in model)


def check_against_chat_template(tokenizer: Any, template: Any) -> str | None:
    """One sentence when ``template`` renders other training text than the tokenizer's chat template."""
    from lmtune.dataset.chat_template import has_chat_template

    if not isinstance(template, dict) or not has_chat_template(tokenizer):
        return None
    chat = _chat_ids(tokenizer)
    if chat is None or same_rendering(tokenizer, _template_ids(tokenizer, dict(template)), chat):
        return None
    names = matching_templates(tokenizer, chat)
    instead = (f"lmtune's PROMPT_TEMPLATE.{names[0]} (from lmtune.dataset import PROMPT_TEMPLATE) renders it"
               + (f", as do {', '.join(names[1:4])}" if len(names) > 1 else "") + "; so does "
               if names else "")
    return (f"the prompt template renders other training text than the tokenizer's chat template (the one "
            f"`lmtune chat` and inference servers use): {instead}prompt_template=None, which renders the chat "
            "template itself. Training goes on with the configured template")


def warn_if_unlike_chat_template(tokenizer: Any, template: Any) -> None:
    message = check_against_chat_template(tokenizer, template)
    if message:
        warn_once(message)
