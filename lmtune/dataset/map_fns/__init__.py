"""Map functions from source formats to the conversation format, and templating."""

from lmtune.dataset.map_fns.dataset_map_fns import (
    alpaca_map_fn,
    alpaca_zh_map_fn,
    default_map_fn,
    oasst1_map_fn,
    openai_map_fn,
    pretrain_map_fn,
)
from lmtune.dataset.map_fns.template_map_fn import template_map_fn, template_map_fn_factory

DATASET_FORMAT_MAPPING = {
    "alpaca": alpaca_map_fn,
    "alpaca_zh": alpaca_zh_map_fn,
    "oasst1": oasst1_map_fn,
    "openai": openai_map_fn,
    "default": default_map_fn,
    "pretrain": pretrain_map_fn,
}

__all__ = [
    "DATASET_FORMAT_MAPPING", "alpaca_map_fn", "alpaca_zh_map_fn", "default_map_fn", "oasst1_map_fn",
    "openai_map_fn", "pretrain_map_fn", "template_map_fn", "template_map_fn_factory",
]
