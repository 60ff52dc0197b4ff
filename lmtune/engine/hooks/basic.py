"""Timing, lr scheduling and sampler seeding hooks."""

from __future__ import annotations

import time

from lmtune.core.hook import Hook


class IterTimerHook(Hook):
    """Records ``time`` (seconds per iteration) and ``data_time`` (waiting for the batch)."""

    priority = "NORMAL"

    def before_train(self, runner) -> None:
        self._last = time.perf_counter()

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        now = time.perf_counter()
        runner.message_hub.update("data_time", now - self._last)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        now = time.perf_counter()
        runner.message_hub.update("time", now - self._last)
        self._last = now

    # a validation pass runs inside the iteration that ends its optimizer step: its time is not the iteration's
    def before_val_epoch(self, runner) -> None:
        self._val_started = time.perf_counter()

    def after_val_epoch(self, runner, metrics) -> None:
        started = getattr(self, "_val_started", None)
        if started is not None and hasattr(self, "_last"):
            self._last += time.perf_counter() - started
        self._val_started = None


class ParamSchedulerHook(Hook):
    """Steps every iteration-based scheduler after each iteration, epoch-based ones after each epoch."""

    priority = "LOW"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        for scheduler in runner.param_schedulers:
            if not scheduler.by_epoch:
                scheduler.step()

    def after_train_epoch(self, runner) -> None:
        for scheduler in runner.param_schedulers:
            if scheduler.by_epoch:
                scheduler.step()


class DistSamplerSeedHook(Hook):
    """Tells the sampler which epoch starts, so every epoch (and rank) gets its own order."""

    priority = "NORMAL"

    def before_train_epoch(self, runner) -> None:
        sampler = getattr(runner.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(runner.epoch)
        batch_sampler = getattr(runner.train_dataloader, "batch_sampler", None)
        if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
            batch_sampler.sampler.set_epoch(runner.epoch)
