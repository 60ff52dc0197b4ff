"""Config files: load, override, dump, and build objects from ``dict(type=...)``."""

from lmtune.config.build import build, is_type_dict
from lmtune.config.config import Config, dumps, parse_overrides
from lmtune.config.configdict import ConfigDict
from lmtune.core.errors import ConfigError

__all__ = ["Config", "ConfigDict", "ConfigError", "build", "dumps", "is_type_dict", "parse_overrides"]
