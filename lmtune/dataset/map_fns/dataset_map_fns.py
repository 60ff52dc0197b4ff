"""Map functions: one source format in, lmtune's conversation format out.

The conversation format is ``{'conversation': [{'system': str, 'input': str,
'output': str}, ...]}``: one dict per round. A round may also carry
``output_with_loss: False`` (the output is context, not trained) and
``need_eos_token: False`` (no EOS after the output). A map function returns an
empty conversation for a row that must be dropped, and raises
:class:`~lmtune.config.ConfigError` naming the field when a row lacks one it needs.

The single-turn formats are here; the multi-turn ones live in
:mod:`.conversation_map_fns` and :mod:`.msagent_map_fn` and are importable from
this module too, as in XTuner's ``xtuner.dataset.map_fns.dataset_map_fns``.
"""

from __future__ import annotations

from lmtune.dataset.map_fns._common import _optional_text, _text
from lmtune.dataset.map_fns.conversation_map_fns import (
    oasst1_map_fn,
    openai_map_fn,
    sharegpt_map_fn,
    wizardlm_map_fn,
)
from lmtune.dataset.map_fns.msagent_map_fn import msagent_react_map_fn
from lmtune.dataset.templates import SYSTEM_TEMPLATE

__all__ = [
    "alpaca_map_fn", "alpaca_zh_map_fn", "arxiv_map_fn", "code_alpaca_map_fn", "colors_map_fn",
    "crime_kg_assitant_map_fn", "default_map_fn", "law_reference_map_fn", "medical_map_fn",
    "msagent_react_map_fn", "oasst1_map_fn", "openai_map_fn", "openorca_map_fn", "pretrain_map_fn",
    "sharegpt_map_fn", "sql_map_fn", "stack_exchange_map_fn", "tiny_codes_map_fn", "wizardlm_map_fn",
]


def _single(output: str, text: str, system: str = "") -> dict:
    """A one-round conversation; ``system`` only when there is one."""
    turn = {"input": text, "output": output}
    if system:
        turn["system"] = system
    return {"conversation": [turn]}


def _instruction_with_input(instruction: str, extra: str) -> str:
    """An instruction and its optional input, one line apart; a blank input adds nothing."""
    extra = extra.strip()
    return f"{instruction}\n{extra}" if extra else instruction


def alpaca_map_fn(example: dict) -> dict:
    """Alpaca: ``instruction`` (+ optional ``input``) -> ``output``; ``<nooutput>`` rows dropped."""
    output = _text(example, "output", "alpaca_map_fn")
    if output.strip() == "<nooutput>":
        return {"conversation": []}
    text = _instruction_with_input(_text(example, "instruction", "alpaca_map_fn"),
                                   _optional_text(example, "input", "alpaca_map_fn"))
    return _single(output, text, SYSTEM_TEMPLATE.alpaca)


def alpaca_zh_map_fn(example: dict) -> dict:
    """Chinese alpaca: ``instruction_zh`` (+ optional ``input_zh``) -> ``output_zh``, no system prompt.

    As in XTuner, no system prompt is added; ``<nooutput>`` rows are dropped as in alpaca.
    """
    output = _text(example, "output_zh", "alpaca_zh_map_fn")
    if output.strip() == "<nooutput>":
        return {"conversation": []}
    text = _instruction_with_input(_text(example, "instruction_zh", "alpaca_zh_map_fn"),
                                   _optional_text(example, "input_zh", "alpaca_zh_map_fn"))
    return _single(output, text)


def medical_map_fn(example: dict) -> dict:
    """shibing624/medical fine-tuning rows: ``instruction`` (+ optional ``input``) -> ``output``."""
    text = _instruction_with_input(_text(example, "instruction", "medical_map_fn"),
                                   _optional_text(example, "input", "medical_map_fn"))
    return _single(_text(example, "output", "medical_map_fn"), text, SYSTEM_TEMPLATE.medical)


def code_alpaca_map_fn(example: dict) -> dict:
    """CodeAlpaca-20K (HuggingFaceH4): ``prompt`` -> ``completion``, under the coder system prompt."""
    return _single(_text(example, "completion", "code_alpaca_map_fn"),
                   _text(example, "prompt", "code_alpaca_map_fn"), SYSTEM_TEMPLATE.coder)


def tiny_codes_map_fn(example: dict) -> dict:
    """nampdn-ai/tiny-codes: ``prompt`` -> ``response``, under the coder system prompt."""
    return _single(_text(example, "response", "tiny_codes_map_fn"),
                   _text(example, "prompt", "tiny_codes_map_fn"), SYSTEM_TEMPLATE.coder)


def sql_map_fn(example: dict) -> dict:
    """b-mc2/sql-create-context: ``context`` (CREATE TABLE statements) and ``question`` -> ``answer``."""
    text = f"{_text(example, 'context', 'sql_map_fn')}\n{_text(example, 'question', 'sql_map_fn')}"
    return _single(_text(example, "answer", "sql_map_fn"), text, SYSTEM_TEMPLATE.sql)


def stack_exchange_map_fn(example: dict) -> dict:
    """ArmelR/stack-exchange-instruction: ``question`` -> ``response``, no system prompt."""
    return _single(_text(example, "response", "stack_exchange_map_fn"),
                   _text(example, "question", "stack_exchange_map_fn"))


def openorca_map_fn(example: dict) -> dict:
    """Open-Orca/OpenOrca: ``system_prompt`` (may be empty) and ``question`` -> ``response``."""
    return _single(_text(example, "response", "openorca_map_fn"),
                   _text(example, "question", "openorca_map_fn"),
                   _optional_text(example, "system_prompt", "openorca_map_fn"))


def arxiv_map_fn(example: dict) -> dict:
    """arXiv metadata: ``abstract`` -> ``title`` (title generation).

    arXiv hard-wraps titles; the title's line breaks and runs of spaces become single spaces.
    """
    title = " ".join(_text(example, "title", "arxiv_map_fn").split())
    return _single(title, _text(example, "abstract", "arxiv_map_fn").strip(), SYSTEM_TEMPLATE.arxiv_gentile)


def colors_map_fn(example: dict) -> dict:
    """burkelibbey/colors: ``description`` (``"<colour name>: <description>"``) -> ``color`` (hex).

    The colour's name before the first colon is left out of the input, so the model learns the
    colour from the description alone; a description without a colon is used whole.
    """
    description = _text(example, "description", "colors_map_fn")
    _, colon, rest = description.partition(":")
    return _single(_text(example, "color", "colors_map_fn"), (rest if colon else description).strip(),
                   SYSTEM_TEMPLATE.colorist)


def law_reference_map_fn(example: dict) -> dict:
    """Legal Q&A with references (law_reference_data): ``question`` -> ``answer``, lawyer system prompt."""
    return _single(_text(example, "answer", "law_reference_map_fn"),
                   _text(example, "question", "law_reference_map_fn"), SYSTEM_TEMPLATE.lawyer)


def crime_kg_assitant_map_fn(example: dict) -> dict:
    """CrimeKgAssitant Q&A (XTuner's spelling): ``input`` -> ``output``, lawyer system prompt."""
    return _single(_text(example, "output", "crime_kg_assitant_map_fn"),
                   _text(example, "input", "crime_kg_assitant_map_fn"), SYSTEM_TEMPLATE.lawyer)


def default_map_fn(example: dict) -> dict:
    """Rows already of the form ``{'input': ..., 'output': ...}`` (``system`` optional)."""
    return _single(_text(example, "output", "default_map_fn"), _text(example, "input", "default_map_fn"),
                   _optional_text(example, "system", "default_map_fn"))


def pretrain_map_fn(example: dict) -> dict:
    """Plain ``text`` for continued pre-training: every token is trained, no template, no EOS per turn."""
    return {"conversation": [{"input": "", "output": _text(example, "text", "pretrain_map_fn").strip(),
                              "need_eos_token": False}]}
