"""What a run sets up before it builds anything: the top-level key check, seeding, the logger, the message hub."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.core.dist import is_main_process
from lmtune.core.errors import ConfigError

logger = logging.getLogger("lmtune")

# Top-level keys the runner reads. A key in a config that is a near miss of one of these (and that one is
# absent) is a typo: without this check `param_schedulr = [...]` would silently train without a schedule.
RUNNER_KEYS = {"model", "tokenizer", "train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg",
               "default_hooks", "custom_hooks", "env_cfg", "visualizer", "log_level", "load_from", "resume",
               "randomness", "log_processor", "work_dir", "launcher", "default_scope", "strategy",
               "sequence_parallel_size", "model_resource",
               # validation (MMEngine's names, and lmtune's one-line forms)
               "val_dataloader", "val_cfg", "val_evaluator", "val_dataset", "val_split", "val_interval",
               "val_before_train", "save_best", "early_stopping",
               # accepted for MMEngine configs; `lmtune train` runs no test stage (nor does `xtuner train`)
               "test_dataloader", "test_cfg", "test_evaluator"}


def check_top_level_keys(cfg: dict) -> None:
    import difflib

    for key in cfg:
        if key in RUNNER_KEYS:
            continue
        close = difflib.get_close_matches(key, sorted(RUNNER_KEYS - set(cfg)), n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"unknown top-level key {key!r}; did you mean {close[0]!r}? "
                              f"(lmtune reads {close[0]!r}, which the config does not set)")


class MessageHub:
    """The latest value of each runtime scalar (``time``, ``data_time``...)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def update(self, key: str, value: Any) -> None:
        self._values[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def setup_logger(log_file: Path | None, level: str = "INFO") -> logging.Logger:
    for handler in list(logger.handlers):
        if getattr(handler, "_lmtune", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level if is_main_process() else "WARNING")
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s - lmtune - %(levelname)s - %(message)s", "%m/%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_main_process():
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._lmtune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


__all__ = ["MessageHub", "check_top_level_keys", "set_random_seed", "setup_logger"]
