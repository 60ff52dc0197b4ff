"""The hook interface: points in the run where hooks act, and their priorities."""

from __future__ import annotations

PRIORITIES = {"HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50,
              "BELOW_NORMAL": 60, "LOW": 70, "VERY_LOW": 90, "LOWEST": 100}


def priority_value(priority: int | str) -> int:
    if isinstance(priority, str):
        return PRIORITIES[priority.upper()]
    return int(priority)


class Hook:
    """Base class. Hooks run in priority order (lower first) at each point."""

    priority = "NORMAL"

    def before_run(self, runner) -> None: ...
    def after_run(self, runner) -> None: ...
    def before_train(self, runner) -> None: ...
    def after_train(self, runner) -> None: ...
    def before_train_epoch(self, runner) -> None: ...
    def after_train_epoch(self, runner) -> None: ...
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None: ...
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None: ...
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None: ...
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None: ...

    @staticmethod
    def every_n_iters(runner, n: int) -> bool:
        return n > 0 and (runner.iter + 1) % n == 0

    @staticmethod
    def is_last_iter(runner) -> bool:
        return runner.iter + 1 >= runner.max_iters
