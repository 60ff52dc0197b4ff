"""Prompt templates, system prompts and constants used across lmtune."""

from lmtune.utils.constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX
from lmtune.utils.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, get_template

__all__ = ["DEFAULT_PAD_TOKEN_INDEX", "IGNORE_INDEX", "PROMPT_TEMPLATE", "SYSTEM_TEMPLATE", "get_template"]
