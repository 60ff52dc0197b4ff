"""Which run a checkpoint belongs to, and whether a config may continue it.

Every run has a ``run_id``: a fresh run draws one, a resumed run adopts its checkpoint's. Each
checkpoint's ``meta.json`` and the work dir's ``last_checkpoint`` pointer carry it, so a run keeps and
deletes only its own checkpoints, and ``--resume`` never picks up another run's.

A checkpoint also records the settings its state depends on (``RESUME_KEYS``: the model, the training
data, the optimizer and its schedules) as flat ``key: text`` pairs. A run that resumes it must have the
same ones: the weights, the data position and the optimizer state mean nothing under others, and a
changed learning rate or schedule would be overwritten by the checkpoint's own state while the dumped
config claims the new one. Everything else (run length, logging, hooks, saving) may change on resume.
"""

from __future__ import annotations

import functools
import re
import uuid
from typing import Any

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# top-level keys (and dotted sub-keys) whose values a resumed run must share with its checkpoint
RESUME_KEYS = ("model", "train_dataloader.dataset", "val_split", "sequence_parallel_size", "optim_wrapper",
               "param_scheduler")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _text(value: Any) -> str:
    """A stable text of a leaf value: callables by their dotted name, never with a memory address."""
    if isinstance(value, functools.partial):
        return f"partial({_text(value.func)}, {value.args!r}, {sorted(value.keywords.items())!r})"
    if isinstance(value, type) or callable(value):
        module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        if module and name:
            return f"{module}.{name}"
    return _ADDRESS.sub("", repr(value))


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            _flatten(value[key], f"{prefix}.{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", out)
    else:
        out[prefix] = _text(value)


def resume_settings(cfg: Any) -> dict[str, str]:
    """The config's values under ``RESUME_KEYS``, flattened to ``{"optim_wrapper.optimizer.lr": "0.0002"}``."""
    out: dict[str, str] = {}
    for dotted in RESUME_KEYS:
        value: Any = cfg
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            _flatten(value, dotted, out)
    return out


def settings_differences(saved: dict[str, str] | None, current: dict[str, str], limit: int = 3) -> list[str]:
    """``key: saved -> current`` for the settings that differ (none when the checkpoint recorded none)."""
    if not saved:
        return []
    changed = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if before != after:
            changed.append(f"{key}: {before} -> {after}")
    if len(changed) > limit:
        changed = changed[:limit] + [f"and {len(changed) - limit} more"]
    return changed
