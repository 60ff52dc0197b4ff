"""The config index: lmtune's built-in configs by name (the files below this folder).

``lmtune train NAME``, ``list-cfg`` and ``copy-cfg`` find a built-in config here; the files themselves are
plain configs (``demo/``, the seed's reference config, the generated library).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtune.core.errors import ConfigError, nearest

CONFIG_ROOT = Path(__file__).parent


def builtin_configs() -> dict[str, Path]:
    """Built-in config name -> file."""
    return {p.stem: p for p in sorted(CONFIG_ROOT.rglob("*.py")) if not p.name.startswith("_")}


def resolve_config(name: str) -> Path:
    """A config path, or the name of a built-in config."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = builtin_configs()
    if name in builtin:
        return builtin[name]
    if path.suffix == ".py" or os.sep in name:
        raise ConfigError(f"config file not found: {name}")
    raise ConfigError(f"{name!r} is neither a config file nor a built-in config{nearest(name, builtin)}")
