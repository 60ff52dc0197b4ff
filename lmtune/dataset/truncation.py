"""The one truncation of a tokenized sample, used by every encoder, the row stages and pre-tokenized data."""

from __future__ import annotations


def truncate(row: dict, max_length: int | None) -> dict:
    """``row`` (``input_ids``, ``labels``, ``length``) cut to its first ``max_length`` tokens; a cut row says
    so with ``truncated: True``. A row that fits is returned as it is."""
    if max_length is None or row["length"] <= max_length:
        return row
    return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length],
            "length": max_length, "truncated": True}


__all__ = ["truncate"]
