"""Keep the library's files in the package equal to its renderer (lmtune/configs/library.py).

The library is data plus a renderer: ``lmtune train NAME`` and the other commands render a config
on demand. Only the variants of ``library.ON_DISK_MODEL`` (the seed's model) are also committed as
files, as examples to read; this script writes them, and removes any other file that carries
``GENERATED_MARK`` (hand-written configs such as demo/ and the seed's reference config are never
touched).

    python tools/make_configs.py              # (re)write the committed files, remove stale generated ones
    python tools/make_configs.py --check      # exit 1 if a committed file is missing, stale or different
    python tools/make_configs.py --all --out DIR   # render the whole library into DIR as files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmtune.configs import library as lib

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "lmtune" / "configs"


def generated_files(root: Path) -> set[str]:
    """Relative paths of the files under ``root`` that the library wrote (GENERATED_MARK is one of their lines)."""
    found = set()
    for path in root.rglob("*.py"):
        with path.open(encoding="utf-8") as f:
            if any(line.rstrip("\n") == lib.GENERATED_MARK for line in f):
                found.add(path.relative_to(root).as_posix())
    return found


def write(root: Path, everything: bool = False) -> tuple[list[str], list[str]]:
    """Write the committed files (or ``everything``) under ``root``; returns (written or changed, removed)."""
    files = lib.library(on_disk_only=not everything)
    changed, removed = [], []
    for rel, text in files.items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    for rel in sorted(generated_files(root) - set(files)):
        (root / rel).unlink()
        removed.append(rel)
        parent = (root / rel).parent
        if parent != root and not any(parent.iterdir()):
            parent.rmdir()
    return changed, removed


def check(root: Path) -> list[str]:
    """Problems that make ``root`` differ from what ``write(root)`` would leave there."""
    files = lib.library(on_disk_only=True)
    problems = [f"missing: {rel}" for rel in files if not (root / rel).is_file()]
    problems += [f"out of date: {rel}" for rel in files
                 if (root / rel).is_file() and (root / rel).read_text(encoding="utf-8") != files[rel]]
    problems += [f"stale: {rel}" for rel in sorted(generated_files(root) - set(files))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CONFIG_ROOT, help="config root (default: lmtune/configs)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    parser.add_argument("--all", action="store_true", help="render every library config, not only the committed")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for line in problems:
            print(line)
        print(f"{len(lib.library(on_disk_only=True))} committed library configs: "
              + ("out of date" if problems else "up to date"))
        return 1 if problems else 0
    changed, removed = write(args.out, everything=args.all)
    print(f"{len(lib.library(on_disk_only=not args.all))} library configs under {args.out}: {len(changed)} written, "
          f"{len(removed)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
