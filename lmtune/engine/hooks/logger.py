"""LoggerHook: progress lines on the console, every scalar in a JSONL file (and any visualizer), a progress
bar on a terminal and the curves of the run at its end."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import torch

from lmtune.core.dist import is_main_process
from lmtune.core.hook import Hook

# throughput figures another hook may put in the message hub (or the loop in its outputs): logged when present
THROUGHPUT_KEYS = ("tokens_per_sec", "tflops", "mfu")
THROUGHPUT_FORMATS = {"tokens_per_sec": ".1f", "tflops": ".2f", "mfu": ".4f"}


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


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressBar:
    """One line on a terminal, redrawn in place: ``iteration/total pct% |bar| elapsed<eta  fields``.

    Redraws are at most one per ``min_interval`` seconds unless forced. ``clear()`` erases the line
    so that other output can go above it; ``redraw()`` puts it back."""

    def __init__(self, stream: Any, total: int, start: int = 0, min_interval: float = 0.25) -> None:
        self.stream = stream
        self.total = max(int(total), 1)
        self.start = int(start)
        self.n = int(start)
        self.fields: list[str] = []
        self.min_interval = min_interval
        self._t0 = time.monotonic()
        self._last_draw = -float("inf")
        self._drawn = False
        self.closed = False
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self._fill, self._empty = ("\u2588", " ") if encoding.startswith("utf") else ("#", "-")

    def render(self, width: int | None = None) -> str:
        elapsed = time.monotonic() - self._t0
        done = self.n - self.start
        if self.n >= self.total:
            timing = _duration(elapsed)
        elif done > 0:
            timing = f"{_duration(elapsed)}<{_duration(elapsed / done * (self.total - self.n))}"
        else:
            timing = f"{_duration(elapsed)}<?"
        cells = 20
        filled = min(cells, int(cells * self.n / self.total))
        bar = self._fill * filled + self._empty * (cells - filled)
        line = "  ".join([f"{self.n}/{self.total} {100 * self.n / self.total:3.0f}%|{bar}| {timing}", *self.fields])
        width = width or shutil.get_terminal_size((120, 20)).columns
        return line[: max(width - 1, 10)]

    def update(self, n: int, fields: list[str] | None = None, force: bool = False) -> None:
        self.n = int(n)
        if fields is not None:
            self.fields = list(fields)
        now = time.monotonic()
        if force or now - self._last_draw >= self.min_interval:
            self.redraw()

    def redraw(self) -> None:
        if self.closed:
            return
        self.stream.write("\r" + self.render() + "\x1b[K")
        self.stream.flush()
        self._drawn = True
        self._last_draw = time.monotonic()

    def clear(self) -> None:
        if self._drawn and not self.closed:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.closed:
            return
        self.redraw()
        self.stream.write("\n")
        self.stream.flush()
        self.closed = True


class _AboveBar:
    """A console handler's stream while a bar is shown: each record erases the bar, prints, redraws it."""

    def __init__(self, stream: Any, bar: ProgressBar) -> None:
        self._stream = stream
        self._bar = bar

    def write(self, text: str) -> Any:
        self._bar.clear()
        written = self._stream.write(text)
        if text.endswith("\n"):
            self._bar.redraw()
        return written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _console_handlers(log: logging.Logger) -> list[logging.StreamHandler]:
    """The handlers that print to the console: the runner's own (``_lmtune``), or any on stdout/stderr
    (not files, nor the capturing handlers a test harness may add)."""
    streams = [h for h in log.handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    own = [h for h in streams if getattr(h, "_lmtune", False)]
    return own or [h for h in streams if h.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]


class LoggerHook(Hook):
    """Every ``interval`` iterations: iteration, lr, loss, grad norm, time, ETA, memory and throughput:
    ``tokens_per_sec`` (non-pad input tokens of all ranks per second over the logging window) and
    ``step_tokens`` (non-pad tokens of the window's last optimizer step, all ranks), on every line,
    terminal or not; ``tflops`` and ``mfu`` (window averages) when ``ThroughputHook`` measures them
    (added by default on a GPU whose peak is known).

    The same scalars go to ``<log_dir>/scalars.jsonl``, one JSON object per line, and to the runner's
    visualizer when the config sets one (TensorBoard, Weights & Biases, MLflow), with the iteration as the
    step. The loss is the mean over all target tokens since the previous line. The last iteration is
    always logged unless ``ignore_last=True``, so a short run still shows its final loss.

    ``progress_bar``: ``'auto'`` (default) shows a single updating line (iteration/total, percentage, ETA,
    loss, lr, throughput) when the console is a terminal, with the log lines printed above it; elsewhere
    (CI, Slurm, files) only the log lines, which are the same either way, as is the log file. ``True`` shows
    it even when the console is not a terminal, ``False`` never. ``plot_curves``: at the end of training
    write ``<log_dir>/curves.png`` (loss, lr, grad norm, throughput; needs matplotlib, skipped without it).
    """

    priority = "BELOW_NORMAL"

    def __init__(self, interval: int = 10, log_metric_by_epoch: bool = False, ignore_last: bool = False,
                 interval_exp_name: int = 1000, out_dir: str | None = None, out_suffix=(".json", ".log", ".py"),
                 keep_local: bool = True, file_client_args: dict | None = None,
                 backend_args: dict | None = None, progress_bar: bool | str = "auto",
                 plot_curves: bool = True) -> None:
        """MMEngine's arguments are accepted; ``interval_exp_name``, ``out_dir``, ``out_suffix``,
        ``keep_local``, ``file_client_args`` and ``backend_args`` have no effect (logs stay in the log dir)."""
        if progress_bar not in (True, False, "auto"):
            raise ValueError(f"progress_bar must be True, False or 'auto', got {progress_bar!r}")
        self.interval = max(1, int(interval))
        self.log_metric_by_epoch = log_metric_by_epoch
        self.ignore_last = ignore_last
        self.progress_bar = progress_bar
        self.plot_curves = bool(plot_curves)
        self._bar: ProgressBar | None = None
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []
        self._last_loss: float | None = None
        self._run_time, self._run_iters = 0.0, 0
        self._reset()

    def _reset(self) -> None:
        self._loss_sum = 0.0
        self._tokens = 0
        self._input_tokens = 0
        self._step_tokens: int | None = None
        self._measured: dict[str, float] = {}  # ThroughputHook's tflops/mfu, weighted by iteration time
        self._measured_time = 0.0
        self._measured_rate: float | None = None
        self._times: list[float] = []
        self._grad_norms: list[float] = []
        self._metrics: dict[str, list[float]] = {}  # the loop's metrics (preference rewards): [sum, count]

    # -- progress bar ------------------------------------------------------
    def _wants_bar(self, stream: Any) -> bool:
        if self.progress_bar == "auto":
            isatty = getattr(stream, "isatty", None)
            return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        return bool(self.progress_bar)

    def _start_bar(self, runner) -> None:
        self._bar = None
        if not is_main_process() or self.progress_bar is False:
            return
        log = getattr(runner, "logger", None)
        handlers = _console_handlers(log) if isinstance(log, logging.Logger) else []
        stream = handlers[0].stream if handlers else sys.stdout
        if not self._wants_bar(stream):
            return
        self._bar = ProgressBar(stream, runner.max_iters, start=runner.iter)
        for handler in handlers:
            if handler.stream is stream:
                handler.setStream(_AboveBar(stream, self._bar))
                self._swapped.append((handler, stream))

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for handler, stream in self._swapped:
            if isinstance(handler.stream, _AboveBar):
                handler.setStream(stream)
        self._swapped = []
        self._bar = None

    def _bar_fields(self, runner, throughput: dict[str, float]) -> list[str]:
        loss = self._loss_sum / self._tokens if self._tokens else self._last_loss
        fields = [] if loss is None else [f"loss {loss:.4f}"]
        fields.append(f"lr {runner.optim_wrapper.get_lr()[0]:.3e}")
        if "tokens_per_sec" in throughput:
            fields.append(f"{throughput['tokens_per_sec']:,.0f} tok/s")
        if "tflops" in throughput:
            fields.append(f"{throughput['tflops']:.1f} TFLOPS")
        if "mfu" in throughput:
            fields.append(f"mfu {throughput['mfu']:.3g}")
        return fields

    def _measure(self, runner, outputs: dict, step_time: float) -> None:
        """Add the iteration to the window's throughput: its tokens, and ThroughputHook's tflops/mfu."""
        self._input_tokens += int(outputs.get("input_tokens", 0))
        if outputs.get("step_tokens") is not None:
            self._step_tokens = int(outputs["step_tokens"])
        hub = getattr(runner, "message_hub", None)
        rate = hub.get("tokens_per_sec") if hub is not None else None
        rate = _as_float(outputs.get("tokens_per_sec") if rate is None else rate)
        if rate is not None:  # a ThroughputHook's (or another loop's) own figure, for loops that count no tokens
            self._measured_rate = rate
        measured = False
        for key in ("tflops", "mfu"):
            value = hub.get(key) if hub is not None else None
            value = _as_float(outputs.get(key) if value is None else value)
            if value is not None:
                self._measured[key] = self._measured.get(key, 0.0) + value * step_time
                measured = True
        if measured:
            self._measured_time += step_time

    def _throughput(self) -> dict[str, float]:
        """The window's throughput: tokens/s over its time, tflops/mfu averaged over it."""
        seconds = sum(self._times)
        if seconds > 0 and self._input_tokens:
            found = {"tokens_per_sec": self._input_tokens / seconds}
        else:
            found = {"tokens_per_sec": self._measured_rate} if self._measured_rate is not None else {}
        if self._measured_time > 0:
            found.update({key: total / self._measured_time for key, total in self._measured.items()})
        return found

    # -- the run -------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._reset()
        self._last_loss = None
        self._run_time, self._run_iters = 0.0, 0
        self._path = runner.log_dir / "scalars.jsonl"
        visualizer = getattr(runner, "visualizer", None)
        if visualizer is not None and is_main_process():
            config_text = getattr(runner, "config_text", None)
            if config_text:
                visualizer.add_config(config_text)
        self._start_bar(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        outputs = outputs or {}
        self._loss_sum += float(outputs.get("loss_sum", 0.0))
        self._tokens += int(outputs.get("num_tokens", 0))
        if "grad_norm" in outputs and outputs["grad_norm"] is not None:
            self._grad_norms.append(float(outputs["grad_norm"]))
        for name, (total, count) in (outputs.get("metrics") or {}).items():
            window = self._metrics.setdefault(name, [0.0, 0.0])
            window[0] += float(total)
            window[1] += float(count)
        step_time = runner.message_hub.get("time", 0.0)
        self._times.append(step_time)
        self._run_time += step_time
        self._run_iters += 1
        self._measure(runner, outputs, step_time)
        last = self.is_last_iter(runner)
        throughput = self._throughput()
        if not (self.every_n_iters(runner, self.interval) or (last and not self.ignore_last)):
            if self._bar is not None:
                self._bar.update(runner.iter + 1, self._bar_fields(runner, throughput))
            return
        scalars = {"iter": runner.iter + 1, "epoch": runner.epoch + 1,
                   "lr": runner.optim_wrapper.get_lr()[0],
                   "loss": self._loss_sum / max(self._tokens, 1),
                   "tokens": self._tokens,
                   "time": sum(self._times) / len(self._times),
                   "data_time": runner.message_hub.get("data_time", 0.0)}
        if self._grad_norms:
            scalars["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        # each over all pairs of the window, on all ranks
        metrics = {name: total / count for name, (total, count) in self._metrics.items() if count}
        scalars.update(metrics)
        scalars["memory"] = peak_memory_mib()
        scalars.update(throughput)
        if self._step_tokens is not None:
            scalars["step_tokens"] = self._step_tokens
        # the mean over the whole run so far: one slow interval (an evaluation, a busy machine) moves it little
        eta = self._run_time / self._run_iters * (runner.max_iters - runner.iter - 1)
        self._reset()
        self._last_loss = scalars["loss"]
        if not is_main_process():
            return
        if self._bar is not None:  # the bar redrawn under the log line shows this iteration
            self._bar.n = runner.iter + 1
            self._bar.fields = self._bar_fields(runner, throughput)
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
        parts += [f"{key}: {throughput[key]:{THROUGHPUT_FORMATS[key]}}" for key in THROUGHPUT_KEYS
                  if key in throughput]
        if "step_tokens" in scalars:
            parts.append(f"step_tokens: {scalars['step_tokens']}")
        parts += [f"{name}: {value:.4f}" for name, value in metrics.items()]
        runner.logger.info("  ".join(parts))
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(scalars) + "\n")
        visualizer = getattr(runner, "visualizer", None)
        if visualizer is not None:
            visualizer.add_scalars({k: v for k, v in scalars.items() if k != "iter"}, step=scalars["iter"])

    def after_val_epoch(self, runner, metrics: dict) -> None:
        """Evaluation scalars (validation, answer metrics) at the iteration they were measured: one console line,
        a ``scalars.jsonl`` row of their own (``{"iter": N, "val/loss": ...}``) and the visualizer."""
        if not is_main_process() or not metrics:
            return
        done = runner.completed_iters
        scalars = {"iter": done, **{key: value if isinstance(value, int) else float(value)
                                    for key, value in metrics.items()}}
        width = len(str(runner.max_iters))
        parts = [f"Iter(val) [{done:>{width}}/{runner.max_iters}]"]
        parts += [f"{key}: {value:.6g}" if not isinstance(value, int) else f"{key}: {value}"
                  for key, value in metrics.items()]
        hub = getattr(runner, "message_hub", None)
        seconds = hub.get("val_time") if hub is not None else None
        if seconds is not None:  # a validation pass (answer metrics come without): how long it took
            hub.update("val_time", None)
            parts.append(f"time: {seconds:.3f}s")
        runner.logger.info("  ".join(parts))
        self._path = runner.log_dir / "scalars.jsonl"
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(scalars) + "\n")
        visualizer = getattr(runner, "visualizer", None)
        if visualizer is not None:
            visualizer.add_scalars({k: v for k, v in scalars.items() if k != "iter"}, step=max(done, 0))

    def after_train(self, runner) -> None:
        self._stop_bar()
        if self.plot_curves and is_main_process():
            self._plot(runner)

    def _plot(self, runner) -> None:
        from lmtune.engine.logging import curves as plot

        if not plot.have_matplotlib():
            runner.logger.info(f"curves.png not drawn: matplotlib is not installed ({plot.MATPLOTLIB_HINT})")
            return
        if not plot.read_scalars(runner.log_dir):
            return
        try:
            png, _, dirs = plot.plot_run(runner.log_dir)
        except Exception as exc:  # noqa: BLE001 - a finished run is not failed by its picture
            runner.logger.warning(f"curves.png not drawn: {type(exc).__name__}: {exc}")
            return
        joined = f" (the {len(dirs)} log dirs of the resumed run)" if len(dirs) > 1 else ""
        runner.logger.info(f"Training curves{joined}: {png}")
