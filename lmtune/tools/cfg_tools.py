"""``lmtune list-cfg`` and ``lmtune copy-cfg``: the built-in configs and DeepSpeed presets."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path
from typing import Any, TextIO

from lmtune.core.errors import ConfigError, nearest

_GLOB_CHARS = set("*?[")


def _matches(name: str, pattern: str | None) -> bool:
    """Case-insensitive: a glob when ``pattern`` has ``* ? [``, else a substring."""
    if not pattern:
        return True
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()


def _configs() -> tuple[dict[str, Path], dict[str, Path]]:
    from lmtune.configs import builtin_configs
    from lmtune.engine.strategies.deepspeed_config import builtin_deepspeed_configs

    return builtin_configs(), builtin_deepspeed_configs()


def list_configs(out: TextIO, pattern: str | None = None) -> int:
    """Write the built-in configs (grouped by family) and DeepSpeed presets matching ``pattern``; how many."""
    from lmtune.configs import CONFIG_ROOT

    configs, presets = _configs()
    groups: dict[str, list[str]] = {}
    for name, path in configs.items():
        if _matches(name, pattern):
            family = path.parent.relative_to(CONFIG_ROOT).as_posix() if path.parent != CONFIG_ROOT else "."
            groups.setdefault(family, []).append(name)
    shown = 0
    if groups:
        out.write("Configs (lmtune train NAME, lmtune copy-cfg NAME DIR):\n")
        for family in sorted(groups):
            out.write(f"  {family}/\n")
            for name in sorted(groups[family]):
                out.write(f"    {name}\n")
                shown += 1
    matching = sorted(name for name in presets if _matches(name, pattern))
    if matching:
        out.write("DeepSpeed presets (lmtune train CONFIG --deepspeed NAME):\n")
        for name in matching:
            out.write(f"    {name}\n")
            shown += 1
    if not shown:
        out.write(f"no built-in config or DeepSpeed preset matches {pattern!r}\n")
    return shown


def copy_config(name: str, dest_dir: str | Path) -> Path:
    """Write the built-in config (or DeepSpeed preset) ``name`` into ``dest_dir``; the new file's path.

    A library config is rendered; the copy is a complete config that imports nothing of the library."""
    from lmtune.configs import config_text

    configs, presets = _configs()
    stem = name.removesuffix(".py").removesuffix(".json")
    source = configs.get(stem) or presets.get(stem)
    if source is None:
        raise ConfigError(f"{name!r} is not a built-in config or DeepSpeed preset{nearest(stem, [*configs, *presets])}"
                          " (lmtune list-cfg lists them)")
    data = config_text(stem).encode("utf-8") if stem in configs else source.read_bytes()
    dest_dir = Path(dest_dir).expanduser()
    if dest_dir.exists() and not dest_dir.is_dir():
        raise ConfigError(f"{dest_dir} exists and is not a directory")
    target = dest_dir / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; not overwriting it (remove it or copy to another directory)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "xb") as fh:  # exclusive: never replaces a file that appeared meanwhile
            fh.write(data)
    except FileExistsError:
        raise ConfigError(f"{target} already exists; not overwriting it") from None
    return target


# ------------------------------------------------------------------ command line

def _list_cmd(args: argparse.Namespace) -> int:
    import sys

    list_configs(sys.stdout, args.pattern)
    return 0


def _copy_cmd(args: argparse.Namespace) -> int:
    target = copy_config(args.name, args.dest)
    print(f"copied to {target}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``list-cfg`` and ``copy-cfg`` on ``subparsers``."""
    lister = subparsers.add_parser("list-cfg", help="list the built-in configs and DeepSpeed presets")
    lister.add_argument("-p", "--pattern", help="only names containing PATTERN (case-insensitive) or matching a "
                                                "glob such as '*qlora*'")
    lister.set_defaults(func=_list_cmd)

    copier = subparsers.add_parser("copy-cfg", help="copy a built-in config (or DeepSpeed preset) to edit it")
    copier.add_argument("name", help="a name from lmtune list-cfg")
    copier.add_argument("dest", metavar="DIR", help="directory to copy into (created if missing)")
    copier.add_argument("--debug", action="store_true", help="show full tracebacks")
    copier.set_defaults(func=_copy_cmd)
