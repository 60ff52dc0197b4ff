"""The config index: lmtune's built-in configs by name.

Two kinds: files in this folder (``demo/``, the seed's reference config, the committed examples of
the library) and the library's configs, rendered on demand from its model table (``library.py``).
``lmtune train NAME``, ``check``, ``convert``, ``list-cfg`` and ``copy-cfg`` find either here;
``load_config`` loads a file or a built-in name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmtune.configs import library
from lmtune.core.errors import ConfigError, nearest

CONFIG_ROOT = Path(__file__).parent


def builtin_configs() -> dict[str, Path]:
    """Built-in config name -> its file (for a library config, where its file would be: it may be rendered only)."""
    found = {p.stem: p for p in sorted(CONFIG_ROOT.rglob("*.py"))
             if not p.name.startswith("_") and p.parent != CONFIG_ROOT}
    for name, (model, _, _) in library.entries().items():
        found.setdefault(name, CONFIG_ROOT / library.relative_path(name, model))
    return dict(sorted(found.items()))


def config_text(name: str) -> str:
    """The text of the built-in config ``name``: its file's, or the library's rendering."""
    path = builtin_configs()[name]
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return library.render_named(name)


def resolve_config(name: str) -> Path:
    """A config path, or the (possibly rendered-only) file of a built-in config's name."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = builtin_configs()
    if name in builtin:
        return builtin[name]
    if path.suffix == ".py" or os.sep in name:
        raise ConfigError(f"config file not found: {name}")
    raise ConfigError(f"{name!r} is neither a config file nor a built-in config{nearest(name, builtin)} "
                      "(lmtune list-cfg lists them)")


def load_config(name: str | os.PathLike, overrides: dict[str, Any] | None = None):
    """The config of a file or of a built-in name, with ``overrides`` (``--cfg-options``) applied."""
    from lmtune.config import Config

    path = resolve_config(str(name))
    if path.is_file():
        return Config.fromfile(path, overrides)
    return Config.fromtext(library.render_named(path.stem), path, overrides)  # a library config, not on disk


__all__ = ["CONFIG_ROOT", "builtin_configs", "config_text", "load_config", "resolve_config"]
