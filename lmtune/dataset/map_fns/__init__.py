"""Map functions from source formats to the conversation format, and templating.

``DATASET_FORMAT_MAPPING`` maps a format's name (what ``dataset_map_fn`` may be given as a
string, and what ``lmtune list-dataset-format`` shows) to its map function.
"""

from lmtune.dataset.map_fns.dataset_map_fns import (
    alpaca_map_fn,
    alpaca_zh_map_fn,
    arxiv_map_fn,
    code_alpaca_map_fn,
    colors_map_fn,
    crime_kg_assitant_map_fn,
    default_map_fn,
    law_reference_map_fn,
    medical_map_fn,
    msagent_react_map_fn,
    oasst1_map_fn,
    openai_map_fn,
    openorca_map_fn,
    pretrain_map_fn,
    sharegpt_map_fn,
    sql_map_fn,
    stack_exchange_map_fn,
    tiny_codes_map_fn,
    wizardlm_map_fn,
)
from lmtune.dataset.map_fns.template_map_fn import template_map_fn, template_map_fn_factory

DATASET_FORMAT_MAPPING = {
    "alpaca": alpaca_map_fn,
    "alpaca_zh": alpaca_zh_map_fn,
    "arxiv": arxiv_map_fn,
    "code_alpaca": code_alpaca_map_fn,
    "colors": colors_map_fn,
    "crime_kg_assitant": crime_kg_assitant_map_fn,
    "default": default_map_fn,
    "law_reference": law_reference_map_fn,
    "medical": medical_map_fn,
    "msagent_react": msagent_react_map_fn,
    "oasst1": oasst1_map_fn,
    "openai": openai_map_fn,
    "openorca": openorca_map_fn,
    "pretrain": pretrain_map_fn,
    "sharegpt": sharegpt_map_fn,
    "sql": sql_map_fn,
    "stack_exchange": stack_exchange_map_fn,
    "tiny_codes": tiny_codes_map_fn,
    "wizardlm": wizardlm_map_fn,
}

__all__ = [
    "DATASET_FORMAT_MAPPING", "alpaca_map_fn", "alpaca_zh_map_fn", "arxiv_map_fn", "code_alpaca_map_fn",
    "colors_map_fn", "crime_kg_assitant_map_fn", "default_map_fn", "law_reference_map_fn", "medical_map_fn",
    "msagent_react_map_fn", "oasst1_map_fn", "openai_map_fn", "openorca_map_fn", "pretrain_map_fn",
    "sharegpt_map_fn", "sql_map_fn", "stack_exchange_map_fn", "template_map_fn", "template_map_fn_factory",
    "tiny_codes_map_fn", "wizardlm_map_fn",
]
