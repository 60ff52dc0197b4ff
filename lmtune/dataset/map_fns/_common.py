"""Field access shared by the map functions: one clear error for a row that lacks what a format needs."""

from __future__ import annotations

from typing import Any

from lmtune.core.errors import ConfigError

_HINT = "choose the dataset_map_fn that matches your data's format"


def _require(example: dict, key: str, fmt: str) -> Any:
    """``example[key]``, or a ConfigError naming ``key`` when it is absent or None."""
    # A row of a file that lacks a field comes out of Arrow with that field set to None.
    if example.get(key) is None:
        raise ConfigError(
            f"a row has no {key!r} field, which {fmt} needs (row fields: {sorted(example)}); {_HINT}"
        )
    return example[key]


def _require_any(example: dict, keys: tuple[str, ...], fmt: str) -> tuple[str, Any]:
    """The first of ``keys`` the row has (name and value), or a ConfigError naming them all."""
    for key in keys:
        if example.get(key) is not None:
            return key, example[key]
    if len(keys) == 1:
        _require(example, keys[0], fmt)
    names = " nor ".join(repr(key) for key in keys)
    raise ConfigError(
        f"a row has neither {names} field, which {fmt} needs (row fields: {sorted(example)}); {_HINT}"
    )


def _as_text(value: Any, where: str, fmt: str) -> str:
    """A field's value as text. Numbers become text (a CSV loader reads a column of digits as int)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # also bool
        return str(value)
    raise ConfigError(f"{where} is a {type(value).__name__}, not text, in a row for {fmt}; {_HINT}")


def _text(example: dict, key: str, fmt: str) -> str:
    """A required text field."""
    return _as_text(_require(example, key, fmt), f"field {key!r}", fmt)


def _optional_text(example: dict, key: str, fmt: str) -> str:
    """An optional text field; absent or None reads as ``''``."""
    value = example.get(key)
    return "" if value is None else _as_text(value, f"field {key!r}", fmt)


def _join(parts: list[str], sep: str = "\n") -> str:
    """The non-empty parts joined by ``sep``."""
    return sep.join(part for part in parts if part)
