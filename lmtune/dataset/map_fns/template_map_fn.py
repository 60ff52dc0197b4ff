"""Apply a prompt template to the conversation format."""

from __future__ import annotations

from functools import partial

from lmtune.utils.templates import get_template


def template_map_fn(example: dict, template: dict) -> dict:
    """Wrap each round's input in the template and append its suffix to the output.

    Adds per round: ``need_eos_token`` (False when the suffix is the EOS) and
    ``sep`` (the text between rounds, never trained).
    """
    rounds = []
    for index, turn in enumerate(example.get("conversation") or []):
        turn = dict(turn)
        text = template["INSTRUCTION"].format(input=turn.get("input", ""), round=index + 1)
        system = turn.get("system") or ""
        if system and template.get("SYSTEM"):
            text = template["SYSTEM"].format(system=system) + text
        turn["input"] = text
        turn["output"] = turn.get("output", "") + (template.get("SUFFIX") or "")
        if turn.get("need_eos_token") is None:  # absent, or None where Arrow filled a missing key
            turn["need_eos_token"] = not template.get("SUFFIX_AS_EOS", False)
        turn["sep"] = template.get("SEP") or ""
        rounds.append(turn)
    return {"conversation": rounds}


def template_map_fn_factory(template: dict | str):
    """The ``template_map_fn`` for ``template`` (a ``PROMPT_TEMPLATE`` entry or its name)."""
    return partial(template_map_fn, template=get_template(template))
