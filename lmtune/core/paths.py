"""Paths a user names for models and adapters."""

from __future__ import annotations

import os

from lmtune.core.errors import UserError


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a directory here rather than a hub id (``namespace/name``)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep + os.sep in path


def check_model_path(path: str, what: str, fix: str) -> None:
    """A ``path`` that looks local but is missing is named as such (not as a malformed hub repository id)."""
    if isinstance(path, str) and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"{what}: the path {path!r} does not exist ({fix})")
