"""On-disk cache of processed datasets, keyed by everything that changes the result.

The key is computed from the configuration alone (the dataset's config with
the size and modification time of local files, the tokenizer's vocabulary,
special tokens and chat template, the source of the map functions, the
template, lengths and packing options, lmtune's version), so every rank can
compute it without loading any data: rank 0 prepares and saves, the other
ranks wait for the saved copy and memory-map it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmtune
from lmtune.core.errors import ConfigError

logger = logging.getLogger("lmtune")

DONE = "lmtune_dataset.json"


def cache_root() -> Path:
    return Path(os.environ.get("LMTUNE_CACHE", Path.home() / ".cache" / "lmtune")) / "datasets"


def _file_stats(value: Any) -> Any:
    """For strings naming local files or directories: their size and mtime (recursively)."""
    if isinstance(value, str) and len(value) < 4096 and os.path.exists(value):
        path = Path(value)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [value, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files[:10000]]]
    if isinstance(value, dict):
        return {str(k): _file_stats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_file_stats(v) for v in value]
    return value


def describe(value: Any) -> Any:
    """A JSON-able description of a config value that changes when its meaning changes."""
    if isinstance(value, functools.partial):
        return {"partial": describe(value.func), "args": describe(value.args),
                "kwargs": describe(value.keywords)}
    if callable(value) and not isinstance(value, type) and hasattr(value, "__code__"):
        try:
            return {"fn": f"{value.__module__}.{value.__qualname__}", "source": inspect.getsource(value)}
        except (OSError, TypeError):
            return {"fn": f"{value.__module__}.{value.__qualname__}"}
    if callable(value):
        owner = getattr(value, "__self__", None)
        name = getattr(value, "__qualname__", type(value).__name__)
        return f"{getattr(owner, '__qualname__', '')}.{name}" if owner is not None else name
    if hasattr(value, "_fingerprint"):  # a datasets.Dataset built in code
        return {"dataset_fingerprint": value._fingerprint}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def tokenizer_signature(tokenizer) -> str:
    parts = [type(tokenizer).__name__, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", None)), str(len(tokenizer)),
             str(getattr(tokenizer, "add_bos_token", None)), str(getattr(tokenizer, "add_eos_token", None))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        vocab = tokenizer.get_vocab()
        parts.append(json.dumps(sorted(vocab.items())))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(**parts: Any) -> str:
    payload = {"lmtune": lmtune.__version__, **{k: describe(_file_stats(v)) for k, v in parts.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def load(key: str):
    """The cached dataset and its stats, or None."""
    from datasets import load_from_disk

    path = cache_root() / key
    if not (path / DONE).is_file():
        return None
    stats = json.loads((path / DONE).read_text())
    return load_from_disk(str(path / "data")), stats


def save(key: str, dataset, stats: dict) -> None:
    """Write atomically: a partly written cache entry is never read."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        dataset.save_to_disk(str(tmp / "data"))
        (tmp / DONE).write_text(json.dumps(stats))
        target = root / key
        if target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def wait_for(key: str, timeout: float, poll: float = 1.0):
    """Another rank is preparing ``key``: wait (at most ``timeout`` seconds) and load it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = load(key)
        if found is not None:
            return found
        time.sleep(poll)
    raise ConfigError(f"waited {timeout:.0f}s for rank 0 to prepare the dataset (cache {cache_root() / key}); "
                      "raise train_dataset.dataset_wait_timeout if preprocessing takes longer")



def prepared(dataset: Any, use_cache: bool, timeout: float, prepare: Callable[[], tuple[Any, dict]],
             report: Callable[[dict], None], **key_parts: Any):
    """The processed form of ``dataset``: from the cache when an entry of the same ``key_parts`` exists (another
    rank of a distributed run waits up to ``timeout`` seconds for rank 0 to write it), else ``prepare()``'s,
    which rank 0 then saves and memory-maps. ``report`` logs the stats either way. Only datasets named by a
    config dict or backed by files are cached."""
    from lmtune.config.build import is_type_dict
    from lmtune.core.dist import get_rank, is_distributed

    key = None
    if use_cache and (is_type_dict(dataset) or getattr(dataset, "cache_files", None)):
        key = cache_key(dataset=dataset, **key_parts)
        found = load(key)
        if found is None and is_distributed() and get_rank() != 0:
            found = wait_for(key, timeout)
        if found is not None:
            data, stats = found
            logger.info(f"Loaded the processed dataset from cache ({cache_root() / key})")
            report(stats)
            return data
    data, stats = prepare()
    report(stats)
    if key is None or get_rank() != 0:
        return data
    save(key, data, stats)
    found = load(key)  # memory-map the saved copy instead of holding the result
    return found[0] if found is not None else data
