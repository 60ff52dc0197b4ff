"""Checkpoint directories written atomically, found again, and loaded safely.

A checkpoint is a directory ``iter_N`` in the work dir:

- ``model.safetensors``: the trained weights (only adapters for LoRA/QLoRA);
- ``optimizer.pt``: optimizer, loss scaler and scheduler states;
- ``trainer_state.pt``: loop position and RNG states;
- ``meta.json``: lmtune version, config digest, seed, iteration, written last.

It is written into a hidden temporary directory and renamed into place, then
the ``last_checkpoint`` file is replaced atomically; a crash mid-save leaves
the previous checkpoints and pointer untouched. Everything loads with
``torch.load(weights_only=True)`` or safetensors: no pickled code runs on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmtune.config.errors import ConfigError

POINTER = "last_checkpoint"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer_state.pt"
META = "meta.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_leftovers(work_dir: Path) -> None:
    """Temporary directories of saves that were killed midway (one writer per work dir)."""
    for path in work_dir.glob(".*_*.tmp"):
        if path.is_dir() and path.name.startswith((".iter_", ".epoch_")):
            shutil.rmtree(path, ignore_errors=True)
    for path in work_dir.glob(".*.old"):
        if path.is_dir() and path.name.startswith((".iter_", ".epoch_")):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(work_dir: str | os.PathLike, name: str, weights: dict[str, torch.Tensor],
                    optimizer_state: dict | None, trainer_state: dict, meta: dict,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write checkpoint ``name`` atomically and point ``last_checkpoint`` at it.

    ``extra_files`` (name -> text) are written alongside, e.g. the effective config.
    """
    from safetensors.torch import save_file

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(work_dir)
    final = work_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=work_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is as readable as the work dir
    try:
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        torch.save(trainer_state, tmp / TRAINER)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        for child in tmp.iterdir():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(work_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(work_dir / POINTER, name + "\n")
    return final


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / WEIGHTS).is_file() and (path / TRAINER).is_file()


def list_checkpoints(work_dir: str | os.PathLike) -> list[Path]:
    """Complete ``iter_N`` checkpoints in the work dir, oldest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = []
    for path in work_dir.iterdir():
        if path.is_dir() and path.name.startswith(("iter_", "epoch_")) and is_complete(path):
            try:
                step = int(json.loads((path / META).read_text())["iter"])
            except (ValueError, KeyError, OSError):
                continue
            found.append((step, path))
    return [path for _, path in sorted(found)]


def find_latest(work_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``last_checkpoint`` names, or else the newest complete one."""
    work_dir = Path(work_dir)
    pointer = work_dir / POINTER
    if pointer.is_file():
        path = work_dir / pointer.read_text().strip()
        if is_complete(path):
            return path
    complete = list_checkpoints(work_dir)
    return complete[-1] if complete else None


def remove_old(work_dir: str | os.PathLike, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep < 0``: keep all)."""
    if keep is None or keep < 0:
        return []
    complete = list_checkpoints(work_dir)
    doomed = complete[: max(0, len(complete) - keep)]
    removed = []
    for path in doomed:
        if protect is not None and path.resolve() == protect.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint directory: ``weights``, ``optimizer`` (or None), ``trainer``, ``meta``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint not found: {path} (expected a directory such as work_dirs/cfg/iter_500)")
    if not is_complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (no {META}); pick another one")
    optimizer = path / OPTIMIZER
    return {
        "weights": load_file(str(path / WEIGHTS)),
        "optimizer": torch.load(optimizer, weights_only=True) if optimizer.is_file() else None,
        "trainer": torch.load(path / TRAINER, weights_only=True),
        "meta": json.loads((path / META).read_text()),
    }
