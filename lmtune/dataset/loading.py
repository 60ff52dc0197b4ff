"""``datasets.load_dataset`` as configs call it, with failures that name the file, the line and the fix.

datasets reports an empty file as a bare ``StopIteration``, a broken JSON line or a binary file as a
``DatasetGenerationError`` that names neither, and a full cache disk as ``[Errno 28]`` without the
path. ``build()`` routes every ``load_dataset`` of a config here: the call is the same, and only when
it fails are the local data files read again to find the culprit.
"""

from __future__ import annotations

import errno
import glob
import json
import os
from pathlib import Path
from typing import Any

from lmtune.core.errors import UserError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow")


def route(fn: Any, kwargs: dict) -> Any:
    """``build()``'s call route: ``datasets.load_dataset`` goes through ``load_dataset``."""
    if getattr(fn, "__module__", "") == "datasets.load" and getattr(fn, "__name__", "") == "load_dataset":
        return load_dataset
    return None


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (StopIteration, DatasetGenerationError, OSError) as exc:
        if _disk_full(exc):  # datasets wraps an ENOSPC of the generation in DatasetGenerationError
            cache = (kwargs.get("cache_dir") or os.environ.get("HF_DATASETS_CACHE")
                     or datasets.config.HF_DATASETS_CACHE)
            raise UserError(f"load_dataset: no space left on the device of the datasets cache ({cache}): free "
                            "space there, or point HF_DATASETS_CACHE (or the dataset's cache_dir) at a disk with "
                            "room") from exc
        if isinstance(exc, OSError):
            raise
        raise UserError(_explain(args, kwargs, exc)) from exc


def _disk_full(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _local_files(args: tuple, kwargs: dict) -> list[Path]:
    """The local files a ``load_dataset`` call reads: its ``data_files`` (relative ones inside a local
    dataset directory), else the files of its local ``path`` (or ``path/data_dir``)."""
    found: list[Path] = []
    path = kwargs.get("path", args[0] if args else None)
    local = isinstance(path, str) and os.path.exists(os.path.expanduser(path))
    base = Path(os.path.expanduser(path)) if local and os.path.isdir(os.path.expanduser(path)) else None

    def add(value: Any, relative_to: Path | None) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                add(item, relative_to)
        elif isinstance(value, dict):
            for item in value.values():
                add(item, relative_to)
        elif isinstance(value, (str, os.PathLike)):
            target = Path(os.path.expanduser(str(value)))
            if relative_to is not None and not target.is_absolute():
                target = relative_to / target
            if target.is_dir():
                found.extend(sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                                    and not any(part.startswith(".") for part in p.relative_to(target).parts)))
            elif target.is_file():
                found.append(target)
            else:
                found.extend(Path(p) for p in sorted(glob.glob(str(target))) if Path(p).is_file())

    add(kwargs.get("data_files"), base)
    if not found and local:
        add(os.path.join(path, kwargs["data_dir"]) if kwargs.get("data_dir") else path, None)
    return found


def _json_lines_problem(path: Path) -> str | None:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                return f"line {number} is not UTF-8 text (is it a binary file?)"
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, where each line must be an object (a row)"
    return None


def _blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _problem(path: Path) -> str | None:
    """What is wrong with one data file, as far as a quick look can tell (None: nothing found)."""
    try:
        if _blank(path):
            return "the file is empty (no rows)"
        if path.suffix not in (".json", ".jsonl"):
            return None
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                return None
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # maybe JSON lines under a .json name: look line by line
        return _json_lines_problem(path)
    except OSError as exc:
        return f"cannot be read ({exc})"


def _explain(args: tuple, kwargs: dict, exc: BaseException) -> str:
    files = _local_files(args, kwargs)
    what = f"load_dataset({', '.join(repr(a) for a in args) or repr(kwargs.get('path'))}"
    what += f", data_files={kwargs['data_files']!r})" if kwargs.get("data_files") else ")"
    for path in files:
        problem = _problem(path)
        if problem:
            return (f"{what}: {path}: {problem}. Fix or remove it; `lmtune check-dataset CONFIG` shows how each "
                    "row is read")
    if not files and isinstance(exc, StopIteration):
        return f"{what}: no data files were found; check data_files (or the dataset path)"
    cause = exc.__cause__ or exc.__context__ or exc
    return f"{what} failed: {type(cause).__name__}: {cause}"
