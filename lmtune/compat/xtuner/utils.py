"""``xtuner.utils`` as an XTuner config imports it: ``PROMPT_TEMPLATE`` with XTuner 0.2.0's own entries.

lmtune's ``lmtune.dataset.PROMPT_TEMPLATE`` follows each model's Hugging Face chat template. XTuner's
entries of the same names sometimes render other text (llama2_chat, chatglm2/3, baichuan, moss_sft,
minicpm, gemma, deepseek_moe, mixtral, deepseek_coder, mistral, zephyr). A config written for XTuner
must train the text XTuner trained, so the ``xtuner.*`` import path gives XTuner's entries, read from
``xtuner_prompt_templates.json`` (written by ``benchmarks/xtuner_templates.py`` from XTuner 0.2.0's
package), and lmtune's for the names XTuner does not have. A run whose template renders differently
from the tokenizer's chat template says so once (``lmtune.dataset.template_check``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lmtune.config.configdict import ConfigDict
from lmtune.dataset.templates import PROMPT_TEMPLATE as LMTUNE_PROMPT_TEMPLATE
from lmtune.dataset.templates import SYSTEM_TEMPLATE

TABLE_FILE = Path(__file__).with_name("xtuner_prompt_templates.json")


def _xtuner_table() -> ConfigDict:
    xtuner = json.loads(TABLE_FILE.read_text(encoding="utf-8"))["templates"]
    table = ConfigDict({name: fields for name, fields in xtuner.items()})
    for name, fields in LMTUNE_PROMPT_TEMPLATE.items():
        if name not in table:
            table[name] = copy.deepcopy(dict(fields))
    return table


PROMPT_TEMPLATE = _xtuner_table()

__all__ = ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE"]
