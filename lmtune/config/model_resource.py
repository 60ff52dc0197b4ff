"""``model_resource``: fetch the model with a download function before anything is built.

A config may say where its model comes from instead of naming a local path::

    from modelscope import snapshot_download

    model_resource = dict(fn=snapshot_download, args=dict(model_id="Shanghai_AI_Laboratory/internlm2-chat-7b"))

(or openMind's ``snapshot_download``, or any function of your own). :func:`apply_model_resource`
calls ``fn(**args)`` once, before the tokenizer, dataset or model is built. Its return value is the
local model directory, and every ``pretrained_model_name_or_path`` of the config is rewritten to it:
the top-level setting and every dict key of that name at any depth (``model.llm``, ``tokenizer``,
the tokenizers of the dataset and of the hooks). Dicts shared by several entries are changed in
place, so every entry that refers to one sees the new path.

``fn`` is the function itself or its dotted path (``"modelscope.snapshot_download"``); ``args``
(keyword arguments) may be left out.

With several processes (``torch.distributed`` initialised) only rank 0 downloads. The others wait
for it, then call ``fn`` themselves with the same arguments: a download function that keeps a local
cache (as the hubs' ``snapshot_download`` functions do) returns the cached directory at once, so every
rank gets its own path without downloading again. A function without a cache would download once per
rank; where the cache is not on a shared file system, each node's ranks fetch into that node's cache.
The wait is on a separate gloo group whose timeout is ``model_resource.wait_timeout`` seconds (default
24 hours), so a long download does not trip the training process group's shorter timeout. If rank 0's
download fails, every rank stops with the same error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtune.config.build import import_dotted
from lmtune.core.errors import ConfigError

logger = logging.getLogger("lmtune")

KEY = "model_resource"
PATH_KEY = "pretrained_model_name_or_path"
DEFAULT_WAIT_TIMEOUT = 24 * 3600.0
_APPLIED = "_lmtune_model_resource_dir"


def _fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname:
        return f"{module}.{qualname}" if module else qualname
    return repr(fn)


def _spec(cfg: Any) -> tuple[Callable, dict, str, float]:
    spec = cfg.get(KEY)
    if not isinstance(spec, dict) or "fn" not in spec:
        raise ConfigError(f"{KEY} must be a dict with fn=<download function> and optionally args=dict(...), "
                          f"got {spec!r}")
    unknown = sorted(set(spec) - {"fn", "args", "wait_timeout"})
    if unknown:
        raise ConfigError(f"{KEY} has unknown key(s) {unknown}: it takes fn, args and wait_timeout")
    fn = spec["fn"]
    name = _fn_name(fn)
    if isinstance(fn, str):
        resolved = import_dotted(fn)
        if resolved is None:
            package = fn.split(".")[0]
            raise ConfigError(f"{KEY}.fn={fn!r} cannot be imported (is the package {package!r} installed?)")
        fn = resolved
    if not callable(fn):
        raise ConfigError(f"{KEY}.fn={name!r} is not a function")
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{KEY}.args must be a dict of keyword arguments for {name}, got {type(args).__name__}")
    wait = spec.get("wait_timeout", DEFAULT_WAIT_TIMEOUT)
    return fn, dict(args), name, float(wait)


def _download(fn: Callable, args: dict, name: str) -> str:
    try:
        path = fn(**args)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function is reported with its name
        raise ConfigError(f"{KEY}: {name}({_args_text(args)}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{KEY}: {name} returned {type(path).__name__} {path!r}, not the path of the local "
                          "model directory")
    path = os.fspath(path)
    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"{KEY}: {name} returned {path!r}, which is not a directory (the model was not "
                          "downloaded there)")
    return str(Path(path).expanduser())


def _args_text(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _fetch(fn: Callable, args: dict, name: str, wait_timeout: float) -> str:
    """``fn(**args)`` on rank 0 first; the other ranks call it after rank 0 is done (see the module doc)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _download(fn, args, name)
    import datetime

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout))
    try:
        path, error = None, None
        if dist.get_rank() == 0:
            try:
                path = _download(fn, args, name)
            except ConfigError as exc:
                error = str(exc)
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)  # the others wait here for rank 0's download
        if box[0] is not None:
            raise ConfigError(box[0])
        if path is None:
            path = _download(fn, args, name)  # cached by now: returns the local path without downloading
        return path
    finally:
        dist.destroy_process_group(group)


def _rewrite(value: Any, path: str, seen: set[int]) -> int:
    """Set every ``pretrained_model_name_or_path`` key under ``value`` to ``path``; how many were set."""
    if id(value) in seen:
        return 0
    count = 0
    if isinstance(value, dict):
        seen.add(id(value))
        for key in list(value):
            if key == PATH_KEY:
                dict.__setitem__(value, key, path)
                count += 1
            else:
                count += _rewrite(value[key], path, seen)
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        for item in value:
            count += _rewrite(item, path, seen)
    return count


def apply_model_resource(cfg: Any) -> Any:
    """Download the model of ``cfg.model_resource`` (if any) and point the config at it; returns ``cfg``.

    ``cfg`` (a :class:`~lmtune.config.Config` or any dict) is changed in place. A config without
    ``model_resource`` is returned unchanged; calling this twice on the same config downloads once.
    """
    if cfg.get(KEY) is None or getattr(cfg, "__dict__", {}).get(_APPLIED):
        return cfg
    fn, args, name, wait_timeout = _spec(cfg)
    path = _fetch(fn, args, name, wait_timeout)
    # the spec itself is left as written: its args may name the hub id, and a second call must see them
    count = _rewrite(cfg, path, {id(cfg[KEY])})
    if count:
        logger.info(f"{KEY}: {name} gave {path}; {count} {PATH_KEY} setting(s) now point there")
    else:
        logger.warning(f"{KEY}: {name} gave {path}, but the config sets no {PATH_KEY} to point there")
    if hasattr(cfg, "__dict__"):
        cfg.__dict__[_APPLIED] = path
    return cfg


__all__ = ["apply_model_resource"]
