"""EarlyStoppingHook: end the run when an evaluation metric stops improving (MMEngine's arguments)."""

from __future__ import annotations

import math

from lmtune.core.errors import ConfigError
from lmtune.core.hook import Hook
from lmtune.engine.checkpoint.hook import metric_rule


class EarlyStoppingHook(Hook):
    """Stop training once ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations
    in a row (or, with ``stopping_threshold``, once it reaches that value; with ``check_finite``, once it is NaN
    or infinite). ``rule`` 'less' or 'greater' (default from the name, as ``CheckpointHook.save_best``).

    The run ends at the end of the optimizer step of that evaluation, after its hooks (the checkpoint there is
    saved). The best value, the count of evaluations without improvement and the decision are kept in every
    checkpoint, so a resumed run decides as the uninterrupted one; a run resumed after it stopped has nothing
    left to train. ``strict=True``: an evaluation of the monitor's kind (``val/...``, ``chat/...``) that does
    not report it is an error. Evaluations before the first iteration (``val_before_train``), and of weights
    already judged (the chat evaluation that starts a resumed run), are shown, not counted.
    """

    priority = "LOW"

    def __init__(self, monitor: str, rule: str | None = None, min_delta: float = 0.1, strict: bool = False,
                 check_finite: bool = True, patience: int = 5, stopping_threshold: float | None = None) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"early_stopping monitor must be a metric name such as 'val/loss', got {monitor!r}")
        if rule not in (None, "less", "greater"):
            raise ConfigError(f"early_stopping rule must be 'less' or 'greater', got {rule!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"early_stopping patience must be a positive integer (evaluations), got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ConfigError(f"early_stopping min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.rule = rule or metric_rule(monitor)
        self.min_delta = float(min_delta)
        self.strict = bool(strict)
        self.check_finite = bool(check_finite)
        self.patience = patience
        self.stopping_threshold = stopping_threshold
        self.best: float | None = None
        self.wait_count = 0
        self.last_iter = 0  # the iteration of the last evaluation counted
        self.stopped: str | None = None  # why the run stopped, once it has

    def _better(self, value: float, than: float) -> bool:
        return value < than - self.min_delta if self.rule == "less" else value > than + self.min_delta

    def after_val_epoch(self, runner, metrics: dict) -> None:
        if runner.completed_iters == 0 or self.stopped:
            return
        if self.monitor not in metrics:
            # strict: the evaluation that reports the monitor's kind of metric (val/..., chat/...) lacks it
            kind = self.monitor.split("/", 1)[0] + "/"
            if self.strict and any(name.startswith(kind) for name in metrics):
                raise ConfigError(f"early_stopping: the evaluation reported no {self.monitor!r} (it reported "
                                  f"{sorted(metrics)}); strict=True stops here")
            return
        if runner.completed_iters <= self.last_iter:  # these weights were judged already (a resumed run's start)
            return
        self.last_iter = runner.completed_iters
        value = float(metrics[self.monitor])
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} is {value}"
        elif self.stopping_threshold is not None and (value <= self.stopping_threshold if self.rule == "less"
                                                      else value >= self.stopping_threshold):
            reason = f"{self.monitor} = {value:.6g} reached stopping_threshold {self.stopping_threshold}"
        elif self.best is None or self._better(value, self.best):
            self.best, self.wait_count = value, 0
        else:
            self.wait_count += 1
            if self.wait_count >= self.patience:
                reason = (f"early stopping: {self.monitor} has not improved on {self.best:.6g} by more than "
                          f"{self.min_delta:g} in {self.wait_count} evaluations (patience {self.patience})")
        if reason is not None:
            self.stopped = reason
            runner.stop_training(reason)

    def before_train(self, runner) -> None:
        if self.stopped:  # resumed after the run had stopped early
            runner.stop_training(f"{self.stopped} (before the checkpoint this run resumed)")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["trainer"].setdefault("early_stopping", {})[self.monitor] = {
            "best": self.best, "wait_count": self.wait_count, "stopped": self.stopped, "last_iter": self.last_iter}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get("trainer", {}).get("early_stopping", {}).get(self.monitor)
        if state:
            self.best, self.wait_count, self.stopped = state["best"], int(state["wait_count"]), state["stopped"]
            self.last_iter = int(state.get("last_iter", 0))
