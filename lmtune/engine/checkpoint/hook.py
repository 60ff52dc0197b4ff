"""CheckpointHook: when to save, and how many checkpoints to keep."""

from __future__ import annotations

import math
from pathlib import Path

from lmtune.core.dist import is_main_process
from lmtune.core.errors import ConfigError
from lmtune.core.hook import Hook
from lmtune.engine.checkpoint import format as ckpt

BEST_FILE = "best_checkpoint"  # beside last_checkpoint: the name of the best checkpoint of the run

LESS_IS_BETTER = ("loss", "ppl", "perplexity", "error")


def metric_rule(metric: str, less_keys: list | tuple = (), greater_keys: list | tuple = ()) -> str:
    """'less' or 'greater': which way ``metric`` improves (explicit keys first, then its name)."""
    if metric in less_keys:
        return "less"
    if metric in greater_keys:
        return "greater"
    return "less" if any(word in metric.lower() for word in LESS_IS_BETTER) else "greater"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permissions...); the previous ones are intact."""


class CheckpointHook(Hook):
    """Save every ``interval`` iterations (``by_epoch=False``) or epochs, and at the end.

    A save that falls inside a gradient-accumulation group happens at the end of
    that group, so a checkpoint never holds half-accumulated gradients.
    ``max_keep_ckpts`` keeps the newest N (-1 keeps all); older ones are deleted
    only after the new one is complete. ``save_optimizer=False`` saves weights
    and position only (such a checkpoint cannot be resumed exactly).

    A save that fails (disk full or any other error) leaves the previous
    checkpoints intact and stops the run with a ``CheckpointSaveError``;
    ``continue_on_error=True`` logs the error and trains on instead, but a
    failed final save still ends the run with the error (its last iterations
    would otherwise be lost without a sign in the exit code). A model
    whose trainable weights are NaN/inf is never saved: the save is refused
    with a warning.
    """

    priority = "VERY_LOW"

    def __init__(self, interval: int = -1, by_epoch: bool = True, save_optimizer: bool = True,
                 save_param_scheduler: bool = True, out_dir: str | None = None, max_keep_ckpts: int = -1,
                 save_last: bool = True, save_best: str | None = None, rule: str | None = None,
                 greater_keys: list | None = None, less_keys: list | None = None, file_client_args: dict | None = None,
                 filename_tmpl: str | None = None, backend_args: dict | None = None,
                 published_keys: list | None = None, save_begin: int = 0,
                 continue_on_error: bool = False) -> None:
        """MMEngine's arguments are accepted. ``save_best``: the name of a logged evaluation metric
        (``'val/loss'``, ``'chat/rouge_l'``, ``'mmlu_fs_val/average'``...; ``'auto'``: the first one the first
        evaluation reports); the checkpoint of the best value so far is kept beside the newest ``max_keep_ckpts``
        (a checkpoint is saved at the iteration of a new best if none is due there) and named in
        ``best_checkpoint``. ``rule`` 'less' or 'greater' (default: 'less' for names in ``less_keys`` or holding
        'loss' or 'ppl', else 'greater'). ``filename_tmpl``, ``file_client_args``, ``backend_args`` and
        ``published_keys`` have no effect; ``save_begin`` delays the first save."""
        if isinstance(save_best, (list, tuple)):
            if len(save_best) != 1:
                raise ConfigError(f"CheckpointHook save_best: lmtune keeps one best checkpoint; name one metric, got "
                                  f"{list(save_best)!r}")
            save_best = save_best[0]
        if save_best is not None and not isinstance(save_best, str):
            raise ConfigError(f"CheckpointHook save_best must be a metric name such as 'val/loss', got {save_best!r}")
        if isinstance(rule, (list, tuple)):
            rule = rule[0] if rule else None
        if rule not in (None, "less", "greater"):
            raise ConfigError(f"CheckpointHook rule must be 'less' or 'greater', got {rule!r}")
        self.save_best = save_best
        self.rule = rule
        self.less_keys = list(less_keys or [])
        self.greater_keys = list(greater_keys or [])
        self.best: dict | None = None  # {"metric", "value", "iter", "name"} of the best checkpoint so far
        self.evaluated_at = 0  # the iteration of the last evaluation of save_best
        self._candidate: dict | None = None  # a new best, kept once its checkpoint is written
        meanings = {"interval": ("save_steps", "no periodic saves"),
                    "max_keep_ckpts": ("save_total_limit", "keeping every checkpoint")}
        for name, value in (("interval", interval), ("max_keep_ckpts", max_keep_ckpts)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
                setting, none = meanings[name]
                raise ConfigError(f"CheckpointHook {name} ({setting}) must be a positive integer, or -1 (as in "
                                  f"MMEngine, also 0) for {none}; got {value!r}")
        self.save_begin = int(save_begin)
        self.interval = int(interval)
        self.by_epoch = by_epoch
        self.save_optimizer = save_optimizer
        self.save_param_scheduler = save_param_scheduler
        self.out_dir = out_dir
        self.max_keep_ckpts = -1 if max_keep_ckpts is None else int(max_keep_ckpts)
        self.save_last = save_last
        self.continue_on_error = bool(continue_on_error)
        self._pending = False

    # -- the best checkpoint ---------------------------------------------------
    def rule_of(self, metric: str) -> str:
        return self.rule or metric_rule(metric, self.less_keys, self.greater_keys)

    def after_val_epoch(self, runner, metrics: dict) -> None:
        if self.save_best is None or runner.completed_iters == 0:  # before training: no checkpoint to keep
            return
        if self.save_best == "auto":
            self.save_best = next(iter(metrics))
        value = metrics.get(self.save_best)
        if value is None or not math.isfinite(value):
            return
        if runner.completed_iters <= self.evaluated_at:  # these weights were judged already (a resumed run)
            return
        self.evaluated_at = runner.completed_iters
        rule = self.rule_of(self.save_best)
        best = self.best["value"] if self.best is not None else None
        if best is None or (value < best if rule == "less" else value > best):
            self._candidate = {"metric": self.save_best, "value": float(value), "iter": runner.completed_iters,
                               "name": f"iter_{runner.completed_iters}", "rule": rule, "evaluated_at":
                               runner.completed_iters}
            self._pending = True  # saved at the end of this optimizer step (now, for validation runs there)
            if runner.last_saved_iter == runner.completed_iters:  # already written at this iteration
                self._pending = False
                self._keep_candidate(runner, runner.last_saved_path)

    def _keep_candidate(self, runner, path) -> None:
        self.best, self._candidate = self._candidate, None
        if path is None or not is_main_process():
            return
        (path.parent / BEST_FILE).write_text(path.name + "\n", encoding="utf-8")
        runner.logger.info(f"Best {self.best['metric']} so far: {self.best['value']:.6g} at iteration "
                           f"{self.best['iter']} ({path})")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        candidate = self._candidate
        if candidate is not None:  # a new best: the checkpoint of the step boundary that follows its evaluation
            candidate.update(iter=runner.completed_iters, name=f"iter_{runner.completed_iters}")
        best = candidate or self.best
        if best is not None:
            checkpoint["trainer"]["best_checkpoint"] = dict(best)
        checkpoint["trainer"]["best_evaluated_at"] = self.evaluated_at

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        trainer = checkpoint.get("trainer", {})
        best = trainer.get("best_checkpoint")
        self.best = dict(best) if best else None
        self.evaluated_at = int(trainer.get("best_evaluated_at", 0))
        if self.best is not None and self.save_best in (None, "auto"):
            self.save_best = self.best["metric"]
        if self.save_best is not None and is_main_process():  # the pointer follows the state resumed
            directory = Path(self.out_dir) if self.out_dir else runner.work_dir
            pointer = directory / BEST_FILE
            if self.best is not None and (directory / self.best["name"]).is_dir():
                pointer.write_text(self.best["name"] + "\n", encoding="utf-8")
            elif pointer.exists():
                pointer.unlink()  # it named a checkpoint of the stretch this resume abandons

    def _protected(self, path) -> list:
        if self.best is None or path is None:
            return [path] if path is not None else []
        return [path, path.parent / self.best["name"]]

    def _save(self, runner, final: bool = False) -> None:
        self._pending = False
        if runner.last_saved_iter == runner.completed_iters:
            return
        bad, example = runner.strategy.count_nonfinite(runner.unwrapped_model)  # every rank decides alike
        if bad:
            runner.logger.warning(f"not saving a checkpoint at iteration {runner.completed_iters}: {bad} "
                                  f"trainable tensors hold NaN/inf (e.g. {example or 'on another rank'}); the "
                                  "previous checkpoints are kept as they are")
            self._candidate = None  # no checkpoint holds that evaluation's weights
            return
        try:
            path = runner.save_checkpoint(out_dir=self.out_dir, save_optimizer=self.save_optimizer)
        except Exception as exc:
            where = self.out_dir or runner.work_dir
            message = (f"saving checkpoint iter_{runner.completed_iters} in {where} failed: "
                       f"{type(exc).__name__}: {exc}. The previous checkpoints are intact")
            if self.continue_on_error and not final:
                runner.logger.error(message + "; training continues (continue_on_error=True)")
                self._candidate = None  # no checkpoint holds that evaluation's weights
                return
            raise CheckpointSaveError(message + "; free space (or fix the cause) and continue with "
                                      "`lmtune train ... --resume`, or set "
                                      "default_hooks.checkpoint.continue_on_error=True to train on "
                                      "without this checkpoint") from exc
        if self._candidate is not None:
            self._keep_candidate(runner, path)
        if is_main_process() and path is not None:
            for old in ckpt.remove_old(path.parent, self.max_keep_ckpts, protect=self._protected(path),
                                       run_id=runner.run_id):
                runner.logger.info(f"Removed old checkpoint {old}")

    def save_now(self, runner) -> None:
        """Save the run as it is (a stop on a signal): where and how this hook saves, errors raised."""
        self._save(runner, final=True)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self.by_epoch and self.every_n_iters(runner, self.interval) and runner.iter + 1 >= self.save_begin:
            self._pending = True
        if self._pending and runner.at_step_boundary:
            self._save(runner)

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch and self.interval > 0 and (runner.epoch + 1) % self.interval == 0:
            self._save(runner)

    def after_train(self, runner) -> None:
        if self.save_last or self._pending:
            self._save(runner, final=True)
