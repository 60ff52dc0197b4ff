"""LoggerHook: progress lines on the console and every scalar in a JSONL file."""

from __future__ import annotations

import datetime
import json
import sys

import torch

from lmtune.engine.dist import is_main_process
from lmtune.engine.hooks.hook import Hook


def peak_memory_mib() -> int:
    """Peak GPU memory allocated by torch on a GPU; peak resident memory of the process on a CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated() // 2**20)
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 2**20 if sys.platform == "darwin" else peak // 2**10)


class LoggerHook(Hook):
    """Every ``interval`` iterations: iteration, lr, loss, grad norm, time, ETA and memory.

    The same scalars go to ``<log_dir>/scalars.jsonl``, one JSON object per line.
    The loss is the mean over all target tokens since the previous line. The
    last iteration is always logged unless ``ignore_last=True``, so a short run
    still shows its final loss.
    """

    priority = "BELOW_NORMAL"

    def __init__(self, interval: int = 10, log_metric_by_epoch: bool = False, ignore_last: bool = False,
                 interval_exp_name: int = 1000, out_dir: str | None = None, out_suffix=(".json", ".log", ".py"),
                 keep_local: bool = True, file_client_args: dict | None = None,
                 backend_args: dict | None = None) -> None:
        """MMEngine's arguments are accepted; ``interval_exp_name``, ``out_dir``, ``out_suffix``,
        ``keep_local``, ``file_client_args`` and ``backend_args`` have no effect (logs stay in the log dir)."""
        self.interval = max(1, int(interval))
        self.log_metric_by_epoch = log_metric_by_epoch
        self.ignore_last = ignore_last
        self._reset()

    def _reset(self) -> None:
        self._loss_sum = 0.0
        self._tokens = 0
        self._times: list[float] = []
        self._grad_norms: list[float] = []

    def before_train(self, runner) -> None:
        self._reset()
        self._path = runner.log_dir / "scalars.jsonl"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        outputs = outputs or {}
        self._loss_sum += float(outputs.get("loss_sum", 0.0))
        self._tokens += int(outputs.get("num_tokens", 0))
        if "grad_norm" in outputs and outputs["grad_norm"] is not None:
            self._grad_norms.append(float(outputs["grad_norm"]))
        self._times.append(runner.message_hub.get("time", 0.0))
        last = self.is_last_iter(runner)
        if not (self.every_n_iters(runner, self.interval) or (last and not self.ignore_last)):
            return
        scalars = {"iter": runner.iter + 1, "epoch": runner.epoch + 1,
                   "lr": runner.optim_wrapper.get_lr()[0],
                   "loss": self._loss_sum / max(self._tokens, 1),
                   "tokens": self._tokens,
                   "time": sum(self._times) / len(self._times),
                   "data_time": runner.message_hub.get("data_time", 0.0)}
        if self._grad_norms:
            scalars["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        scalars["memory"] = peak_memory_mib()
        eta = scalars["time"] * (runner.max_iters - runner.iter - 1)
        self._reset()
        if not is_main_process():
            return
        width = len(str(runner.max_iters))
        parts = [f"Iter(train) [{runner.iter + 1:>{width}}/{runner.max_iters}]",
                 f"lr: {scalars['lr']:.4e}",
                 f"eta: {datetime.timedelta(seconds=int(eta))}",
                 f"time: {scalars['time']:.4f}",
                 f"data_time: {scalars['data_time']:.4f}"]
        parts.append(f"memory: {scalars['memory']}")
        parts.append(f"loss: {scalars['loss']:.4f}")
        if "grad_norm" in scalars:
            parts.append(f"grad_norm: {scalars['grad_norm']:.4f}")
        runner.logger.info("  ".join(parts))
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(scalars) + "\n")
