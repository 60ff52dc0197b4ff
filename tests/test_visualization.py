"""See the run: the progress bar on a terminal (plain lines elsewhere), every scalar in scalars.jsonl and in
the configured trackers (TensorBoard, W&B, MLflow), the curves PNG at the end and from ``lmtune plot``."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import sys
import time
import types
from pathlib import Path

import pytest

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.engine.hooks import LoggerHook
from lmtune.engine.logging import curves as plot
from lmtune.engine.logging.visualization import (
    LocalVisBackend,
    MLflowVisBackend,
    Visualizer,
    WandbVisBackend,
    build_visualizer,
)

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
ESC = "\x1b"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ a runner stand-in for the hook

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Hub:
    def __init__(self, **values) -> None:
        self.values = dict(values)

    def update(self, key, value) -> None:
        self.values[key] = value

    def get(self, key, default=None):
        return self.values.get(key, default)


class FakeRunner:
    """What LoggerHook reads of a Runner: iteration counters, lr, message hub, logger, log dir, visualizer."""

    def __init__(self, log_dir: Path, stream, max_iters: int, visualizer=None, **hub) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.max_iters, self.iter, self.epoch = log_dir, max_iters, 0, 0
        self.message_hub = Hub(**hub)
        self.optim_wrapper = types.SimpleNamespace(get_lr=lambda: [2e-4])
        self.visualizer = visualizer
        self.config_text = "lr = 2e-4\n"
        self.logger = logging.Logger(f"lmtune-test-{id(self)}", logging.INFO)
        console = logging.StreamHandler(stream)
        console._lmtune = True  # as the Runner marks its console handler
        self.log_file = log_dir / "run.log"
        for handler in (console, logging.FileHandler(self.log_file, encoding="utf-8")):
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            self.logger.addHandler(handler)

    def close(self) -> None:
        for handler in self.logger.handlers:
            handler.close()


def drive(hook: LoggerHook, runner: FakeRunner, iters: int | None = None) -> None:
    """One training run's hook calls: loss 2.0 per token, grad norm 1.5."""
    hook.before_train(runner)
    for i in range(iters or runner.max_iters):
        runner.iter = i
        runner.message_hub.update("time", 0.01)
        hook.after_train_iter(runner, i, outputs={"loss_sum": 20.0, "num_tokens": 10, "grad_norm": 1.5})
    runner.iter = iters or runner.max_iters
    hook.after_train(runner)
    runner.close()


def log_lines_of_tty(text: str) -> list[str]:
    """The log lines of a console that also held the bar: each log line follows a clear-line sequence."""
    return [seg.rsplit(f"{ESC}[K", 1)[-1] for seg in text.split("\n") if seg.rsplit(f"{ESC}[K", 1)[-1]]


def same_memory(line: str) -> str:
    return re.sub(r"memory: \d+", "memory: M", line)  # the process's peak memory may grow between runs


# ------------------------------------------------------------------ progress bar

def test_progress_bar_on_a_terminal_plain_lines_elsewhere(tmp_path):
    outputs = {}
    for kind, stream in (("tty", FakeTTY()), ("pipe", io.StringIO())):
        runner = FakeRunner(tmp_path / kind, stream, max_iters=20, tokens_per_sec=12345.0, mfu=0.41)
        drive(LoggerHook(interval=5, plot_curves=False), runner)
        outputs[kind] = (stream.getvalue(), runner.log_file.read_text())

    tty, tty_log = outputs["tty"]
    pipe, pipe_log = outputs["pipe"]
    # not a terminal: exactly the log lines, nothing else
    assert "\r" not in pipe and ESC not in pipe
    pipe_lines = pipe.splitlines()
    assert len(pipe_lines) == 4 and all(line.startswith("INFO Iter(train) [") for line in pipe_lines)
    assert "tokens_per_sec: 12345.0" in pipe_lines[0] and "mfu: 0.4100" in pipe_lines[0]
    # a terminal: the same log lines, each printed above the bar, which is redrawn in place
    assert "\r" in tty and f"{ESC}[K" in tty
    assert [same_memory(line) for line in log_lines_of_tty(tty)] == [same_memory(line) for line in pipe_lines]
    final_bar = tty.rstrip("\n").rsplit("\r", 1)[-1]
    assert final_bar.startswith("20/20 100%|") and "loss 2.0000" in final_bar and "12,345 tok/s" in final_bar
    assert "lr 2.000e-04" in final_bar and "mfu 0.41" in final_bar
    assert tty.endswith("\n")
    # the log file never holds the bar
    for log in (tty_log, pipe_log):
        assert "\r" not in log and ESC not in log and len(log.splitlines()) == 4


def test_progress_bar_redraws_a_few_times_a_second_and_follows_the_switch(tmp_path):
    stream = FakeTTY()
    runner = FakeRunner(tmp_path / "fast", stream, max_iters=2000)
    start = time.monotonic()
    drive(LoggerHook(interval=1000, plot_curves=False), runner)
    elapsed = time.monotonic() - start
    draws = stream.getvalue().count("\r") - stream.getvalue().count(f"\r{ESC}[K")  # redraws, not clears
    # 2 log lines each redraw the bar, plus the final one, plus at most 4 a second in between
    assert draws <= 2 + 1 + 1 + int(elapsed / 0.25) + 1, (draws, elapsed)

    never, forced = FakeTTY(), io.StringIO()
    drive(LoggerHook(interval=5, progress_bar=False, plot_curves=False),
          FakeRunner(tmp_path / "never", never, max_iters=10))
    drive(LoggerHook(interval=5, progress_bar=True, plot_curves=False),
          FakeRunner(tmp_path / "forced", forced, max_iters=10))
    assert "\r" not in never.getvalue() and len(never.getvalue().splitlines()) == 2
    assert forced.getvalue().rstrip("\n").rsplit("\r", 1)[-1].startswith("10/10 100%")
    with pytest.raises(ValueError, match="progress_bar"):
        LoggerHook(progress_bar="yes")


# ------------------------------------------------------------------ scalars reach the file and the visualizer

class Recorder(LocalVisBackend):
    """A backend that keeps what it is sent."""

    def __init__(self, save_dir=None) -> None:
        super().__init__(save_dir)
        self.scalars: list[tuple[int, dict]] = []
        self.configs: list[str] = []
        self.closed = False

    def add_scalars(self, scalars, step=0, **kwargs) -> None:
        self.scalars.append((step, dict(scalars)))

    def add_config(self, cfg_text, **kwargs) -> None:
        self.configs.append(cfg_text)

    def close(self) -> None:
        self.closed = True


def test_every_logged_scalar_is_in_the_jsonl_and_reaches_the_visualizer(tmp_path):
    visualizer = build_visualizer(dict(type=Visualizer, vis_backends=[dict(type=Recorder)]), tmp_path / "log",
                                  {"lr": 2e-4})
    runner = FakeRunner(tmp_path / "log", io.StringIO(), max_iters=7, visualizer=visualizer,
                        tokens_per_sec=900.0, tflops=1.25)
    drive(LoggerHook(interval=3, plot_curves=False), runner)
    visualizer.close()

    rows = read_jsonl(tmp_path / "log" / "scalars.jsonl")
    assert [r["iter"] for r in rows] == [3, 6, 7]  # every 3rd iteration and the last
    expected = {"iter", "epoch", "lr", "loss", "tokens", "time", "data_time", "grad_norm", "memory",
                "tokens_per_sec", "tflops"}
    assert all(set(r) == expected for r in rows)
    assert all(math.isclose(r["loss"], 2.0) and r["tokens_per_sec"] == 900.0 for r in rows)
    recorder = visualizer.get_backend("Recorder")
    assert recorder.configs == ["lr = 2e-4\n"]
    assert recorder.scalars == [(r["iter"], {k: v for k, v in r.items() if k != "iter"}) for r in rows]
    assert recorder.closed


# ------------------------------------------------------------------ trackers

def test_tensorboard_event_files_hold_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    visualizer = build_visualizer(dict(type="Visualizer", vis_backends=[dict(type="TensorboardVisBackend")]),
                                  tmp_path / "log", {})
    logged = {1: {"loss": 2.5, "lr": 1e-4}, 2: {"loss": 2.25, "lr": 2e-4}, 5: {"loss": 1.75, "lr": 1.5e-4}}
    visualizer.add_config("lr = 2e-4\n")
    for step, scalars in logged.items():
        visualizer.add_scalars({**scalars, "note": "not a number"}, step)
    visualizer.close()

    events = EventAccumulator(str(tmp_path / "log" / "vis_data"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    for key in ("loss", "lr"):
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [1, 2, 5]
        assert all(math.isclose(v, logged[s][key], rel_tol=1e-6) for s, v in read)


@pytest.mark.parametrize("backend, modules, pip", [
    ("WandbVisBackend", ["wandb"], "pip install wandb"),
    ("MLflowVisBackend", ["mlflow"], "pip install mlflow"),
    ("TensorboardVisBackend", ["torch.utils.tensorboard", "tensorboardX"], "pip install tensorboard"),
])
def test_a_missing_tracker_package_is_a_config_error(tmp_path, monkeypatch, backend, modules, pip):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, installed or not
    with pytest.raises(ConfigError) as err:
        build_visualizer(dict(type=Visualizer, vis_backends=[dict(type=backend)]), tmp_path, {})
    assert backend in str(err.value) and pip in str(err.value)


def test_a_missing_tracker_package_stops_the_runner_before_any_model_loads(tmp_path, monkeypatch):
    from lmtune.engine.runner import Runner

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = Config.fromfile(SEED_CFG, {"visualizer": dict(type="Visualizer", vis_backends=[
        dict(type="WandbVisBackend", init_kwargs=dict(project="p"))])})
    with pytest.raises(ConfigError, match="pip install wandb"):
        Runner.from_config(cfg, work_dir=str(tmp_path / "work"))  # the model id is not even looked up


def test_unknown_backend_and_bad_visualizer_entries_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="TensorboardVisBackend"):
        build_visualizer(dict(type=Visualizer, vis_backends=[dict(type="TensorbordVisBackend")]), tmp_path, {})
    with pytest.raises(ConfigError, match="unknown key"):
        build_visualizer(dict(type=Visualizer, vis_backend=[]), tmp_path, {})
    assert build_visualizer(None, tmp_path, {}) is None


def fake_module(name: str, calls: list, **attrs) -> types.ModuleType:
    """A stand-in package whose functions record ``(name, args, kwargs)`` (the real one is not installed here)."""
    module = types.ModuleType(name)

    def recorder(fn_name, result=None):
        def fn(*args, **kwargs):
            calls.append((fn_name, args, kwargs))
            return result
        return fn

    for fn_name, result in attrs.items():
        setattr(module, fn_name, recorder(fn_name, result))
    module.recorder = recorder
    return module


def test_wandb_backend_passes_init_kwargs_and_logs_by_iteration(tmp_path, monkeypatch):
    # wandb itself is not a test dependency: a stand-in records how lmtune calls it
    calls: list = []
    run = types.SimpleNamespace()
    wandb = fake_module("wandb", calls, init=run)
    for fn in ("log", "save", "finish", "define_metric"):
        setattr(run, fn, wandb.recorder(f"run.{fn}"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    init = dict(project="lmtune-test", name="tiny", mode="offline")
    vis = build_visualizer(dict(type=Visualizer, vis_backends=[dict(type=WandbVisBackend, init_kwargs=init,
                                                                    define_metric_cfg={"loss": "min"})]),
                           tmp_path / "log", {"lr": 2e-4, "model": {"type": "x"}})
    assert calls == []  # nothing starts until the first write
    vis.add_config("lr = 2e-4\n")
    vis.add_scalars({"loss": 1.5, "lr": 2e-4}, step=10)
    vis.close()
    vis.close()  # idempotent

    names = [c[0] for c in calls]
    assert names == ["init", "run.define_metric", "run.save", "run.log", "run.finish"]
    init_kwargs = calls[0][2]
    assert {k: init_kwargs[k] for k in init} == init
    assert init_kwargs["dir"] == str(tmp_path / "log" / "vis_data") and init_kwargs["config"] == {"lr": 2e-4}
    assert calls[3][1] == ({"loss": 1.5, "lr": 2e-4},) and calls[3][2]["step"] == 10
    assert (tmp_path / "log" / "vis_data" / "config.py").read_text() == "lr = 2e-4\n"


def test_mlflow_backend_defaults_to_mlruns_in_the_work_dir_and_only_rank0_writes(tmp_path, monkeypatch):
    calls: list = []
    mlflow = fake_module("mlflow", calls, set_tracking_uri=None, set_experiment=None, start_run=None,
                         log_params=None, log_metrics=None, log_text=None, log_artifact=None, end_run=None,
                         get_experiment_by_name=None, create_experiment=None, set_tags=None)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    log_dir = tmp_path / "work" / "20250101_000000"
    log_dir.mkdir(parents=True)
    (log_dir / "scalars.jsonl").write_text("{}\n")
    cfg = dict(type=Visualizer, vis_backends=[dict(type=MLflowVisBackend, exp_name="sft")])

    import lmtune.engine.logging.visualization as visualization

    monkeypatch.setattr(visualization, "is_main_process", lambda: False)
    quiet = build_visualizer(cfg, log_dir, {"lr": 1e-3})
    quiet.add_scalars({"loss": 1.0}, step=1)
    quiet.close()
    assert calls == []  # other ranks build (and check) the backend, but write nothing

    monkeypatch.setattr(visualization, "is_main_process", lambda: True)
    vis = build_visualizer(cfg, log_dir, {"lr": 1e-3})
    vis.add_config("lr = 1e-3\n")
    vis.add_scalars({"loss": 1.0, "grad_norm": float("nan")}, step=4)
    vis.close()
    by_name = {name: (args, kwargs) for name, args, kwargs in calls}
    assert by_name["set_tracking_uri"][0] == ((tmp_path / "work" / "mlruns").as_uri(),)
    assert by_name["set_experiment"][0] == ("sft",)
    assert by_name["start_run"][1] == {"run_name": "20250101_000000"}
    assert by_name["log_params"][0] == ({"lr": 1e-3},)
    assert by_name["log_metrics"] == (({"loss": 1.0},), {"step": 4})  # NaN is not sent (MLflow rejects it)
    assert by_name["log_text"][0] == ("lr = 1e-3\n", "config.py")
    assert by_name["log_artifact"][0] == (str(log_dir / "scalars.jsonl"),)
    assert calls[-1][0] == "end_run"


def test_a_tracker_failing_mid_run_is_switched_off_with_a_warning(tmp_path):
    class Broken(Recorder):
        def add_scalars(self, scalars, step=0, **kwargs) -> None:
            raise OSError("disk full")

    vis = build_visualizer(dict(type=Visualizer, vis_backends=[dict(type=Broken), dict(type=Recorder)]),
                           tmp_path, {})
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    logging.getLogger("lmtune").addHandler(handler)
    try:
        for step in (1, 2):
            vis.add_scalars({"loss": 1.0}, step)
    finally:
        logging.getLogger("lmtune").removeHandler(handler)
    warnings = seen.getvalue().splitlines()
    assert len(warnings) == 1 and "Broken.add_scalars failed (OSError: disk full)" in warnings[0]
    assert [s for s, _ in vis.get_backend("Recorder").scalars] == [1, 2]  # the others go on
    vis.close()


# ------------------------------------------------------------------ an XTuner-style config trains with a visualizer

def test_xtuner_visualizer_config_loads_and_trains(tmp_path, tiny_model_dir, oasst1_dir, monkeypatch):
    from lmtune.engine.runner import Runner

    source = SEED_CFG.read_text()
    assert source.count("\nvisualizer = None\n") == 1
    source = source.replace("\nvisualizer = None\n", "\nfrom mmengine.visualization import Visualizer, "
                            "LocalVisBackend\nvisualizer = dict(type=Visualizer, vis_backends=[dict(type="
                            "LocalVisBackend)])\n")
    cfg_path = tmp_path / "xtuner_style.py"
    cfg_path.write_text(source)
    cfg = Config.fromfile(cfg_path, {
        "pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir, "max_length": 64,
        "max_epochs": 1, "accumulative_counts": 1, "save_steps": 1000, "evaluation_freq": 1000,
        "custom_hooks": [], "model.llm.quantization_config": None, "default_hooks.logger.interval": 1,
        "train_cfg.max_epochs": None, "train_cfg.max_iters": 4})
    assert cfg.visualizer["type"] is Visualizer and cfg.visualizer["vis_backends"][0]["type"] is LocalVisBackend
    console = FakeTTY()
    monkeypatch.setattr(sys, "stdout", console)  # the runner's console handler writes here: a terminal
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    assert isinstance(runner.visualizer, Visualizer)
    runner.train()
    monkeypatch.undo()

    rows = read_jsonl(runner.log_dir / "scalars.jsonl")
    assert [r["iter"] for r in rows] == list(range(1, runner.max_iters + 1))
    assert all({"loss", "lr", "grad_norm", "time", "memory"} <= set(r) and math.isfinite(r["loss"]) for r in rows)
    shown = console.getvalue()
    assert f"{runner.max_iters}/{runner.max_iters} 100%|" in shown and f"{ESC}[K" in shown
    log_text = next(runner.log_dir.glob("*.log")).read_text()
    assert "Iter(train) [" in log_text and ESC not in log_text and "\r" not in log_text
    assert not (runner.log_dir / "vis_data").exists()  # LocalVisBackend: scalars.jsonl is the local record
    assert Config.fromfile(runner.work_dir / cfg_path.name).visualizer["type"] is Visualizer  # dumped, loads back
    png = runner.log_dir / plot.CURVES_FILE
    if have("matplotlib"):
        assert png.stat().st_size > 0
    else:
        assert not png.exists() and "matplotlib is not installed" in log_text


# ------------------------------------------------------------------ curves of a resumed run

def write_log_dir(work: Path, name: str, rows: list[dict], resumed_at: int | None = None,
                  log: bool = True) -> Path:
    log_dir = work / name
    log_dir.mkdir(parents=True)
    (log_dir / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if log:
        line = f"Resumed from {work}/iter_{resumed_at} at iteration {resumed_at}" if resumed_at else "started"
        (log_dir / f"{name}.log").write_text(f"01/01 00:00:00 - lmtune - INFO - {line}\n")
    return log_dir


def row(it: int, loss: float, **extra) -> dict:
    return {"iter": it, "epoch": 1, "lr": 1e-4 * it, "loss": loss, "grad_norm": 1.0 + it / 10, **extra}


@pytest.fixture
def resumed_work(tmp_path) -> Path:
    """An earlier unrelated run; then a run that crashed at 7 after its checkpoint at 4, resumed to 10."""
    work = tmp_path / "work"
    write_log_dir(work, "20250101_090000", [row(i, 9.0) for i in range(1, 11)])
    write_log_dir(work, "20250101_100000", [row(i, 5.0 - i / 10) for i in range(1, 8)])
    last = write_log_dir(work, "20250101_100000_1", [row(i, 3.0 - i / 10, tokens_per_sec=100.0 * i)
                                                     for i in range(5, 11)], resumed_at=4)
    with open(last / "scalars.jsonl", "a") as fh:
        fh.write('{"iter": 11, "lo')  # killed while writing
    return work


def test_a_resumed_runs_scalars_are_joined_in_iteration_order(resumed_work):
    rows, dirs, resumes = plot.collect(resumed_work)
    assert [d.name for d in dirs] == ["20250101_100000", "20250101_100000_1"]  # the older run is not mixed in
    assert [r["iter"] for r in rows] == list(range(1, 11))  # in order, none twice, the torn line dropped
    assert [r["loss"] for r in rows[:4]] == [5.0 - i / 10 for i in range(1, 5)]  # before the resume point
    assert [r["loss"] for r in rows[4:]] == [3.0 - i / 10 for i in range(5, 11)]  # the run that went on
    assert resumes == [4]
    assert plot.series(rows, "tokens_per_sec") == (list(range(5, 11)), [100.0 * i for i in range(5, 11)])
    # a log dir given: the run that ends there
    assert [d.name for d in plot.run_parts(resumed_work / "20250101_100000")] == ["20250101_100000"]
    assert [d.name for d in plot.run_parts(resumed_work / "20250101_090000")] == ["20250101_090000"]


def test_four_panels_whether_or_not_throughput_was_measured():
    measured = [row(i, 1.0, time=0.5, tokens_per_sec=10.0) for i in (1, 2)]
    unmeasured = [row(i, 1.0, time=0.5) for i in (1, 2)]
    assert [p[0] for p in plot.panels_of(measured)] == ["loss", "lr", "grad_norm", "tokens_per_sec"]
    assert [p[0] for p in plot.panels_of(unmeasured)] == ["loss", "lr", "grad_norm", "time"]
    assert plot.panels_of([{"iter": 1, "time": 0.5}]) == []  # time alone is no run to draw


def test_parts_without_a_log_file_are_joined_by_their_iterations():
    first = [row(i, 1.0) for i in (2, 4, 6)]
    second = [row(i, 2.0) for i in (6, 8)]
    merged = plot.merge_parts([(0, first), (None, second)])
    assert [(r["iter"], r["loss"]) for r in merged] == [(2, 1.0), (4, 1.0), (6, 2.0), (8, 2.0)]
    assert [r["iter"] for r in plot.merge_parts([(0, first), (3, second)])] == [2, 6, 8]


def run_plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmtune")
    from lmtune.tools import plot as plot_cli

    plot_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_plot_command_writes_a_png_of_the_resumed_run(resumed_work, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    assert run_plot_command(["plot", str(resumed_work)]) == 0
    png = resumed_work / "20250101_100000_1" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "10 logged iterations, 1..10, from 2 log dirs" in capsys.readouterr().out
    out = tmp_path / "elsewhere" / "run.png"
    assert run_plot_command(["plot", str(resumed_work / "20250101_090000"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_is_a_lmtune_subcommand(resumed_work, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    from lmtune.cli import main

    out = tmp_path / "cli.png"
    assert main(["plot", str(resumed_work), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_without_matplotlib_the_plot_is_skipped_at_the_end_and_the_command_says_what_to_install(
        resumed_work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        run_plot_command(["plot", str(resumed_work)])
    stream = io.StringIO()
    runner = FakeRunner(tmp_path / "log", stream, max_iters=3)
    drive(LoggerHook(interval=1), runner)
    skipped = [line for line in stream.getvalue().splitlines() if "matplotlib" in line]
    assert skipped == ["INFO curves.png not drawn: matplotlib is not installed (pip install matplotlib)"]
    assert not (tmp_path / "log" / "curves.png").exists()


def test_validation_rows_join_their_iteration_and_share_the_loss_panel(tmp_path):
    rows = [row(i, 2.0 - i / 10) for i in (1, 2, 3, 4)]
    validation = [{"iter": 2, "val/loss": 1.9, "val/ppl": 6.7}, {"iter": 4, "val/loss": 1.7, "val/ppl": 5.5}]
    merged = plot.merge_parts([(0, rows[:2] + validation[:1] + rows[2:] + validation[1:])])
    assert [r["iter"] for r in merged] == [1, 2, 3, 4]
    assert merged[1]["loss"] == pytest.approx(1.8) and merged[1]["val/loss"] == 1.9
    assert plot.series(merged, "val/loss") == ([2, 4], [1.9, 1.7])
    assert [p[0] for p in plot.panels_of(merged)][0] == "loss"  # drawn there, not on a panel of its own
    if plot.have_matplotlib():
        png = plot.draw(merged, tmp_path / "curves.png")
        assert png.stat().st_size > 0


def test_validation_scalars_reach_the_console_the_jsonl_and_the_visualizer(tmp_path):
    visualizer = build_visualizer(dict(type=Visualizer, vis_backends=[dict(type=Recorder)]), tmp_path / "log", {})
    stream = io.StringIO()
    runner = FakeRunner(tmp_path / "log", stream, max_iters=10, visualizer=visualizer)
    runner.completed_iters = 4
    hook = LoggerHook(plot_curves=False)
    hook.after_val_epoch(runner, {"val/loss": 1.25, "val/ppl": math.exp(1.25), "val/tokens": 300})
    visualizer.close()
    rows = read_jsonl(tmp_path / "log" / "scalars.jsonl")
    assert rows == [{"iter": 4, "val/loss": 1.25, "val/ppl": math.exp(1.25), "val/tokens": 300}]
    assert "Iter(val) [ 4/10]  val/loss: 1.25  val/ppl: 3.49034  val/tokens: 300" in stream.getvalue()
    recorder = visualizer.get_backend("Recorder")
    assert recorder.scalars == [(4, {"val/loss": 1.25, "val/ppl": math.exp(1.25), "val/tokens": 300})]
