"""The hook interface: points in the run where hooks act, their priorities, and the view of the run they get.

On the ground floor so that every part that brings a hook (the engine's hooks, checkpointing, the XTuner
stand-ins) can subclass it without importing the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

PRIORITIES = {"HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50,
              "BELOW_NORMAL": 60, "LOW": 70, "VERY_LOW": 90, "LOWEST": 100}


def priority_value(priority: int | str) -> int:
    if isinstance(priority, str):
        return PRIORITIES[priority.upper()]
    return int(priority)


class RunView(Protocol):
    """What a hook may read or call on the runner it is given: these names and no others (a test holds
    lmtune's own hooks to it), so the runner can change behind them."""

    # where the run is
    iter: int  # completed iterations before the current one
    epoch: int
    max_iters: int
    completed_iters: int  # iterations done, the current one included once its after_train_iter hooks run
    at_step_boundary: bool  # the last micro-batch ended an optimizer step
    # what it trains with
    cfg: Any
    config_text: str  # the effective config, as dumped into the work dir
    device: torch.device
    strategy: Any  # lmtune.engine.strategies.Strategy
    optim_wrapper: Any
    param_schedulers: list
    train_dataloader: Any
    unwrapped_model: torch.nn.Module  # the SupervisedFinetune, outside any DDP / FSDP / DeepSpeed wrapper
    # where it writes and reports
    work_dir: Path
    log_dir: Path
    logger: logging.Logger
    message_hub: Any  # scalars of the current iteration (MMEngine's MessageHub interface)
    run_id: str  # this run's id: its checkpoints carry it (a resumed run keeps its checkpoint's)
    last_saved_iter: int | None
    last_saved_path: Path | None

    def save_checkpoint(self, out_dir: str | None = None, save_optimizer: bool = True) -> Path | None: ...
    def report_metrics(self, metrics: dict) -> None: ...  # evaluation scalars: to every hook's after_val_epoch
    def stop_training(self, reason: str) -> None: ...  # end the run after the current optimizer step


class Hook:
    """Base class. Hooks run in priority order (lower first) at each point; ``runner`` is a ``RunView``."""

    priority = "NORMAL"

    def before_run(self, runner: RunView) -> None: ...
    def after_run(self, runner: RunView) -> None: ...
    def before_train(self, runner: RunView) -> None: ...
    def after_train(self, runner: RunView) -> None: ...
    def before_train_epoch(self, runner: RunView) -> None: ...
    def after_train_epoch(self, runner: RunView) -> None: ...
    def before_train_iter(self, runner: RunView, batch_idx: int, data_batch=None) -> None: ...
    def after_train_iter(self, runner: RunView, batch_idx: int, data_batch=None, outputs=None) -> None: ...
    def before_val_epoch(self, runner: RunView) -> None: ...
    def after_val_epoch(self, runner: RunView, metrics: dict) -> None: ...  # validation or answer metrics
    def before_save_checkpoint(self, runner: RunView, checkpoint: dict) -> None: ...
    def after_load_checkpoint(self, runner: RunView, checkpoint: dict) -> None: ...

    @staticmethod
    def every_n_iters(runner: RunView, n: int) -> bool:
        return n > 0 and (runner.iter + 1) % n == 0

    @staticmethod
    def is_last_iter(runner: RunView) -> bool:
        return runner.iter + 1 >= runner.max_iters


__all__ = ["PRIORITIES", "Hook", "RunView", "priority_value"]
