"""Checkpoint directories written atomically, found again, and loaded safely.

A checkpoint is a directory ``iter_N`` in the work dir:

- ``model.safetensors``: the trained weights (only adapters for LoRA/QLoRA);
- ``optimizer.pt``: optimizer, loss scaler and scheduler states; under FSDP2 one
  ``optimizer.rank<R>.pt`` per rank instead (``meta.json`` says how many);
- ``trainer_state.pt``: loop position and RNG states;
- ``meta.json``: lmtune version, run id, config digest, the settings a resume must share
  (``lineage``), seed, iteration and the size of every file, written last.

It is written into a hidden temporary directory and renamed into place, then
the ``last_checkpoint`` file (the checkpoint's name, then ``run_id=<id>``) is
replaced atomically; a crash mid-save leaves the previous checkpoints and
pointer untouched. ``find_latest`` starts from the pointer and considers only
the pointer's run; it verifies a checkpoint's files (sizes as recorded,
safetensors header, trainer state and optimizer state readable without running
pickled code) and falls back, with a warning, to the run's previous checkpoint
when they are not sound. Everything loads with ``torch.load(weights_only=True)``
or safetensors: no pickled code runs on load.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmtune.core.errors import ConfigError

POINTER = "last_checkpoint"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer_state.pt"
META = "meta.json"

# Test hook, for fault-injection tests only: seconds to sleep after each file of a save is written, so that a
# test can kill the process while a save is in progress. Unset (the default) means no sleep.
SLOW_SAVE_ENV = "LMTUNE_TEST_SLOW_SAVE"


def _test_slow_save() -> None:
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))


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


def optimizer_shard_name(rank: int) -> str:
    return f"optimizer.rank{rank}.pt"


def staged_shard_path(work_dir: Path, name: str, rank: int) -> Path:
    """Where rank ``rank`` writes its optimizer shard before rank 0 moves it into checkpoint ``name``."""
    return Path(work_dir) / f".{name}.rank{rank}.shard.tmp"


def write_file(path: Path, write: Callable[[], Any]) -> None:
    """Run ``write`` (which writes ``path``); a failure names the path, and a full disk says so.

    torch's zip writer reports a full disk as "enforce fail at inline_container.cc" (a RuntimeError),
    safetensors as "os error 28", and an ``OSError`` raised deep inside a writer often carries no file
    name."""
    try:
        write()
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except Exception as exc:  # torch's RuntimeError, safetensors' SafetensorError ("os error 28")
        text = str(exc)
        if not any(mark in text for mark in ("inline_container", "write failed", "os error 28", "No space left")):
            raise
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = 0
        if free < 256 << 20:
            raise OSError(errno.ENOSPC, f"No space left on device ({free >> 20} MiB free)", str(path)) from exc
        raise OSError(errno.EIO, f"writing failed: {str(exc).splitlines()[0][:200]}", str(path)) from exc


def write_staged_shard(work_dir: Path, name: str, rank: int, state: Any) -> Path:
    path = staged_shard_path(work_dir, name, rank)
    write_file(path, lambda: torch.save(state, path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return path


def _remove_leftovers(work_dir: Path, keep: set[Path] = frozenset()) -> None:
    """Temporary files and directories of saves that were killed midway (one writer per work dir)."""
    for path in work_dir.glob(".*_*.tmp"):
        if path in keep or not path.name.startswith((".iter_", ".epoch_")):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(".shard.tmp"):
            path.unlink(missing_ok=True)
    for path in work_dir.glob(".*.old"):
        if path.is_dir() and path.name.startswith((".iter_", ".epoch_")):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(work_dir: str | os.PathLike, name: str, weights: dict[str, torch.Tensor],
                    optimizer_state: dict | None, trainer_state: dict, meta: dict,
                    extra_files: dict[str, str] | None = None, move_in: dict[str, Path] | None = None) -> Path:
    """Write checkpoint ``name`` atomically and point ``last_checkpoint`` at it.

    ``extra_files`` (name -> text) are written alongside, e.g. the effective config;
    ``move_in`` (name -> path) are files already written (other ranks' optimizer shards)
    that are moved into the checkpoint before it is renamed into place.
    """
    from safetensors.torch import save_file

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    move_in = dict(move_in or {})
    _remove_leftovers(work_dir, keep=set(move_in.values()))
    final = work_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=work_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is as readable as the work dir
    try:
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        for file_name, source in move_in.items():
            os.replace(source, tmp / file_name)
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        write_file(tmp / WEIGHTS, lambda: save_file(tensors, str(tmp / WEIGHTS)))
        _test_slow_save()
        if optimizer_state is not None:
            write_file(tmp / OPTIMIZER, lambda: torch.save(optimizer_state, tmp / OPTIMIZER))
            _test_slow_save()
        write_file(tmp / TRAINER, lambda: torch.save(trainer_state, tmp / TRAINER))
        _test_slow_save()
        # the sizes of the state files (not of the config copy, which a user may edit) tell a foreign file
        state = {child.name: child.stat().st_size for child in sorted(tmp.iterdir())
                 if child.name not in (extra_files or {})}
        meta = {**meta, "files": state}
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
        for source in move_in.values():
            Path(source).unlink(missing_ok=True)
        raise
    write_text_atomic(work_dir / POINTER, pointer_text(name, meta.get("run_id")))
    return final


def pointer_text(name: str, run_id: str | None) -> str:
    return f"{name}\n" + (f"run_id={run_id}\n" if run_id else "")


def read_pointer(work_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """``(checkpoint name, run id)`` of the work dir's ``last_checkpoint`` (``None`` for what it lacks)."""
    try:
        lines = (Path(work_dir) / POINTER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, None
    name = lines[0].strip() if lines and lines[0].strip() else None
    run_id = next((line.split("=", 1)[1].strip() for line in lines[1:] if line.startswith("run_id=")), None)
    return name, run_id or None


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's ``meta.json`` ({} when it is missing or unreadable)."""
    try:
        meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_of(path: str | os.PathLike) -> str | None:
    """The run id a checkpoint was saved by (None for checkpoints of lmtune before run ids)."""
    return read_meta(path).get("run_id")


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / WEIGHTS).is_file() and (path / TRAINER).is_file()


def list_checkpoints(work_dir: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Complete ``iter_N`` checkpoints in the work dir, oldest first; with ``run_id``, only that run's."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = []
    for path in work_dir.iterdir():
        if path.is_dir() and path.name.startswith(("iter_", "epoch_")) and is_complete(path):
            meta = read_meta(path)
            try:
                step = int(meta["iter"])
            except (ValueError, KeyError, TypeError):
                continue
            if run_id is None or meta.get("run_id") == run_id:
                found.append((step, path))
    return [path for _, path in sorted(found)]


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated file is not)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(fh.read(length))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{size} bytes where the header describes {8 + length + end}")


def _check_torch_file(path: Path) -> None:
    """Readable as lmtune wrote it, without running pickled code; storages are mapped, not read."""
    try:
        torch.load(path, weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        torch.load(path, weights_only=True)  # a legacy (non-zip) archive cannot be mapped


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory cannot be resumed from, or None when it is sound.

    Cheap checks only: the weights are not read; the trainer and optimizer states are unpickled with
    ``weights_only=True`` and their tensors memory-mapped, so an archive holding pickled objects (or none
    at all) is damage, like a truncated file or one of another size than the save wrote.
    """
    path = Path(path)
    for name in (META, WEIGHTS, TRAINER):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        int(meta["iter"])
        shards = int(meta.get("optimizer_shards") or 0)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return f"{META} is unreadable ({exc})"
    for name, size in dict(meta.get("files") or {}).items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} is not the file this checkpoint saved ({(path / name).stat().st_size} bytes, {size} saved)"
    try:
        _check_safetensors(path / WEIGHTS)
    except (ValueError, KeyError, TypeError, OSError, struct.error) as exc:
        return f"{WEIGHTS} is corrupt ({exc})"
    archives = [path / TRAINER] + [path / optimizer_shard_name(r) for r in range(shards)]
    if (path / OPTIMIZER).exists() or (meta.get("optimizer") and not shards):
        archives.append(path / OPTIMIZER)
    for archive_path in archives:
        if not archive_path.is_file():
            return f"{archive_path.name} is missing"
        try:
            _check_torch_file(archive_path)
        except Exception as exc:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
            return f"{archive_path.name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_latest(work_dir: str | os.PathLike, warn: Callable[[str], Any] | None = None) -> Path | None:
    """The checkpoint a resume continues from: ``last_checkpoint``'s when it is sound, else the newest sound
    checkpoint of the pointer's run (of every checkpoint when the pointer names no run).

    A damaged candidate is reported through ``warn`` (default: the ``lmtune`` logger) and skipped.
    Raises ``ConfigError`` when the run has checkpoints but none of them is sound: starting over would
    silently discard the run.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    warn = warn or logging.getLogger("lmtune").warning
    pointed, run_id = read_pointer(work_dir)
    candidates = [p for p in work_dir.iterdir()
                  if p.is_dir() and p.name.startswith(("iter_", "epoch_")) and _step_of(p) >= 0
                  and (run_id is None or _may_be_of(p, run_id))]
    ordered = sorted(candidates, key=lambda p: (p.name != pointed, -_step_of(p), p.name))
    damaged = []
    for path in ordered:
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        damaged.append(f"{path.name} ({reason})")
        warn(f"checkpoint {path} is incomplete or corrupt: {reason}; trying the run's previous one")
    if damaged:
        raise ConfigError(f"no checkpoint in {work_dir} can be resumed: {'; '.join(damaged)}. Resume from a "
                          "copy of a sound one with --resume PATH, or start a new run with another --work-dir")
    return None


def _may_be_of(path: Path, run_id: str) -> bool:
    """Whether checkpoint ``path`` may belong to run ``run_id``: it says so, or its meta is unreadable (a
    damaged checkpoint, reported as such). One that names no run (lmtune before run ids) is another's."""
    meta = read_meta(path)
    return not meta or meta.get("run_id") == run_id


def remove_old(work_dir: str | os.PathLike, keep: int, protect: Path | list[Path] | None = None,
               run_id: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of run ``run_id`` (``keep < 0``: keep all).

    Checkpoints of other runs (and, when ``run_id`` is given, those without a run id) are never touched, nor
    those in ``protect`` (the one just written; the best one, kept beside the newest ``keep``)."""
    if keep is None or keep < 0:
        return []
    kept = {Path(p).resolve() for p in ([protect] if isinstance(protect, (str, Path)) else protect or [])}
    complete = list_checkpoints(work_dir, run_id=run_id)
    doomed = [path for path in complete[: max(0, len(complete) - keep)] if path.resolve() not in kept]
    removed = []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint directory: ``weights``, ``optimizer`` (or None), ``trainer``, ``meta``.

    Of a checkpoint with per-rank optimizer shards, ``optimizer`` is the shard of ``rank``
    (None when the checkpoint has no shard for it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint not found: {path} (expected a directory such as work_dirs/cfg/iter_500)")
    if not is_complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (no {META}); pick another one")
    meta = json.loads((path / META).read_text())
    optimizer = path / (optimizer_shard_name(rank) if meta.get("optimizer_shards") else OPTIMIZER)
    return {
        "weights": load_file(str(path / WEIGHTS)),
        "optimizer": torch.load(optimizer, weights_only=True) if optimizer.is_file() else None,
        "trainer": torch.load(path / TRAINER, weights_only=True),
        "meta": meta,
    }
