"""Checkpoints you can trust: non-finite steps, corrupt checkpoints, failing saves, kill -9 at random moments."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_for_logged_iterations

import lmtune
from lmtune.cli import main
from lmtune.config import Config, ConfigError
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.runner import Runner
from lmtune.engine.runner.loops import NonFiniteLossError

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def overrides(model_dir, data_dir, **extra) -> dict:
    """The built-in config on the tiny model: fp32 LoRA without dropout, no chat evaluation."""
    base = {"pretrained_model_name_or_path": model_dir, "data_path": data_dir, "max_length": 64,
            "train_cfg.max_epochs": None, "train_cfg.max_iters": 12,
            "accumulative_counts": 1, "save_steps": 2, "save_total_limit": -1, "lr": 1e-3,
            "model.llm.quantization_config": None, "model.llm.torch_dtype": torch.float32,
            "model.lora.lora_dropout": 0.0, "optim_wrapper.dtype": "float32",
            "model.use_activation_checkpointing": False, "custom_hooks": [],
            "default_hooks.logger.interval": 1}
    base.update(extra)
    return base


def make_runner(tmp_path, model_dir, data_dir, name="w", **extra) -> Runner:
    cfg = Config.fromfile(SEED_CFG, overrides(model_dir, data_dir, **extra))
    return Runner.from_config(cfg, work_dir=str(tmp_path / name), seed=5)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lmtune_log():
    handler = Records()
    log = logging.getLogger("lmtune")
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


def params(runner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in runner.unwrapped_model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ non-finite loss

def nan_at(runner, bad_iters: set[int]) -> None:
    """Make the model's loss NaN at the given (1-based) iterations."""
    model = runner.model
    forward = model.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if runner.iter + 1 in bad_iters:
            out = dict(out)
            out["loss_sum"] = out["loss_sum"] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        return out

    model.forward = patched


def test_nonfinite_steps_are_skipped_and_the_count_resets(tmp_path, tiny_model_dir, oasst1_dir, lmtune_log):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, **{"optim_wrapper.max_nonfinite_steps": 3})
    assert runner.optim_wrapper.max_nonfinite_steps == 3
    nan_at(runner, {3, 4, 6, 7})  # at most two in a row: never stops
    seen = {}
    step = runner.optim_wrapper.optimizer.step

    def counting_step(*args, **kwargs):
        seen[runner.iter + 1] = params(runner)
        return step(*args, **kwargs)

    runner.optim_wrapper.optimizer.step = counting_step
    runner.train()
    assert sorted(set(range(1, runner.max_iters + 1)) - set(seen)) == [3, 4, 6, 7]  # no optimizer step there
    warned = [m for m in lmtune_log if "not finite" in m]
    assert len(warned) == 4 and "iteration 3:" in warned[0] and "iteration 7:" in warned[-1]
    assert "(2 in a row" in warned[1] and "(1 in a row" in warned[2]  # a good step reset the count
    assert runner.optim_wrapper.nonfinite_steps == 0
    assert all(torch.isfinite(p).all() for p in params(runner).values())
    assert ckpt.find_latest(runner.work_dir).name == f"iter_{runner.max_iters}"


def test_too_many_nonfinite_steps_stop_the_run(tmp_path, tiny_model_dir, oasst1_dir, lmtune_log):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, **{"optim_wrapper.max_nonfinite_steps": 3})
    nan_at(runner, {3, 4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row.*iteration 5"):
        runner.train()
    assert runner.iter == 4  # stopped at iteration 5, before its hooks
    assert [p.name for p in ckpt.list_checkpoints(runner.work_dir)] == ["iter_2", "iter_4"]


def test_nonfinite_step_via_the_cli_exits_nonzero(tmp_path, tiny_model_dir, oasst1_dir, capsys, monkeypatch):
    from lmtune.model.sft import SupervisedFinetune

    real = SupervisedFinetune.forward

    def inf_loss(self, *args, **kwargs):
        out = dict(real(self, *args, **kwargs))
        out["loss_sum"] = out["loss_sum"] * float("inf")
        return out

    monkeypatch.setattr(SupervisedFinetune, "forward", inf_loss)
    code = main(["train", str(SEED_CFG), "--work-dir", str(tmp_path / "w"), "--cfg-options",
                 *_cli_opts(tiny_model_dir, oasst1_dir), "optim_wrapper.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert code != 0 and "NonFiniteLossError" in err and "2 optimizer steps in a row" in err, err
    assert not list((tmp_path / "w").glob("iter_*"))


def test_a_nan_model_is_never_saved(tmp_path, tiny_model_dir, oasst1_dir, lmtune_log):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, save_steps=100, **{"train_cfg.max_iters": 3})
    runner.train()
    good = ckpt.find_latest(runner.work_dir)
    before = (good / ckpt.WEIGHTS).read_bytes()
    hook = next(h for h in runner.hooks if type(h).__name__ == "CheckpointHook")
    with torch.no_grad():
        next(p for p in runner.unwrapped_model.parameters() if p.requires_grad)[0].fill_(float("nan"))
    runner.train_loop.iter += 1
    hook._save(runner)
    assert ckpt.find_latest(runner.work_dir) == good and (good / ckpt.WEIGHTS).read_bytes() == before
    assert not (runner.work_dir / f"iter_{runner.iter}").exists()
    assert any("not saving a checkpoint" in m and "NaN" in m for m in lmtune_log)


# ------------------------------------------------------------------ corrupt newest checkpoint

def _corrupt(path: Path, how: str) -> None:
    if how == "truncated_weights":
        data = (path / ckpt.WEIGHTS).read_bytes()
        (path / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "missing_trainer":
        (path / ckpt.TRAINER).unlink()
    elif how == "corrupt_meta":
        (path / ckpt.META).write_text("{not json")
    elif how == "garbage_trainer":
        (path / ckpt.TRAINER).write_bytes(b"\0" * 100)
    elif how == "truncated_optimizer":
        data = (path / ckpt.OPTIMIZER).read_bytes()
        (path / ckpt.OPTIMIZER).write_bytes(data[: len(data) // 2])
    elif how == "missing_optimizer":
        (path / ckpt.OPTIMIZER).unlink()
    elif how == "foreign_optimizer":  # another checkpoint's optimizer state copied in
        (path / ckpt.OPTIMIZER).write_bytes((path.parent / "iter_2" / ckpt.OPTIMIZER).read_bytes() + b"\0")
    elif how == "pickled_optimizer":  # an archive that unpickles arbitrary objects, of the size meta records
        from fractions import Fraction

        torch.save({"optim_wrapper": Fraction(1, 3)}, path / ckpt.OPTIMIZER)
        meta = json.loads((path / ckpt.META).read_text())
        meta["files"][ckpt.OPTIMIZER] = (path / ckpt.OPTIMIZER).stat().st_size
        (path / ckpt.META).write_text(json.dumps(meta))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, tiny_model_dir, oasst1_dir,
                                                                       lmtune_log):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 6})
    runner.train()
    work = runner.work_dir
    names = [p.name for p in ckpt.list_checkpoints(work)]
    assert names == ["iter_2", "iter_4", "iter_6"]
    for how in ("truncated_weights", "missing_trainer", "corrupt_meta", "garbage_trainer", "truncated_optimizer",
                "missing_optimizer", "foreign_optimizer", "pickled_optimizer"):
        copy = tmp_path / how
        copy.mkdir()
        for name in names:
            import shutil

            shutil.copytree(work / name, copy / name)
        (copy / ckpt.POINTER).write_text("iter_6\n")
        _corrupt(copy / "iter_6", how)
        warnings: list[str] = []
        assert ckpt.find_latest(copy, warn=warnings.append) == copy / "iter_4", how
        assert len(warnings) == 1 and "iter_6" in warnings[0], (how, warnings)
    assert "UnpicklingError" in warnings[0] or "weights_only" in warnings[0], warnings
    # the runner reports it and resumes from the previous one
    lmtune_log.clear()
    resumed = Runner.from_config(runner.cfg, work_dir=str(tmp_path / "truncated_weights"), resume=True)
    assert resumed.iter == 4
    assert any("iter_6 is incomplete or corrupt" in m for m in lmtune_log), lmtune_log
    # every checkpoint damaged: --resume stops with the reasons instead of starting the run over
    every = tmp_path / "pickled_optimizer"
    for name in ("iter_2", "iter_4"):
        _corrupt(every / name, "missing_trainer")
    with pytest.raises(ConfigError, match="no checkpoint in .* can be resumed: iter_6 .*iter_4 .*iter_2"):
        Runner.from_config(runner.cfg, work_dir=str(every), resume=True)
    assert sorted(p.name for p in every.iterdir()) == ["iter_2", "iter_4", "iter_6", "last_checkpoint"]


# ------------------------------------------------------------------ a run owns its checkpoints

def _runner(tmp_path, model_dir, data_dir, name="w", run: dict | None = None, **extra) -> Runner:
    cfg = Config.fromfile(SEED_CFG, overrides(model_dir, data_dir, **extra))
    return Runner.from_config(cfg, work_dir=str(tmp_path / name), seed=5, **(run or {}))


def test_a_new_run_never_destroys_an_earlier_runs_checkpoints(tmp_path, tiny_model_dir, oasst1_dir, lmtune_log):
    first = _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 6})
    first.train()
    work = first.work_dir
    kept = {p.name: (p / ckpt.WEIGHTS).read_bytes() for p in ckpt.list_checkpoints(work)}
    assert sorted(kept) == ["iter_2", "iter_4", "iter_6"]
    entries = sorted(p.name for p in work.iterdir())
    # a fresh run of an edited config into the same work dir is refused, before anything is written
    with pytest.raises(ConfigError, match="earlier run .*--resume.*--work-dir.*--overwrite"):
        _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 3, "save_total_limit": 1})
    assert sorted(p.name for p in work.iterdir()) == entries
    # --overwrite: the new run saves and prunes only its own checkpoints
    second = _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"overwrite": True},
                     **{"train_cfg.max_iters": 3, "save_steps": 3, "save_total_limit": 1})
    second.train()
    assert second.run_id != first.run_id
    assert {p.name: (p / ckpt.WEIGHTS).read_bytes() for p in ckpt.list_checkpoints(work, first.run_id)} == kept
    assert ckpt.read_pointer(work) == ("iter_3", second.run_id)
    # --resume follows last_checkpoint (iter_3 of the second run), not the highest number (the first's iter_6)
    lmtune_log.clear()
    resumed = _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"resume": True},
                      **{"train_cfg.max_iters": 5, "save_steps": 3, "save_total_limit": 1})
    assert resumed.iter == 3 and resumed.run_id == second.run_id
    assert any(f"Resumed run {second.run_id} from {work / 'iter_3'} at iteration 3 of 5" in m for m in lmtune_log)
    resumed.train()
    assert [p.name for p in ckpt.list_checkpoints(work, second.run_id)] == ["iter_5"]  # its own iter_3 pruned
    assert {p.name: (p / ckpt.WEIGHTS).read_bytes() for p in ckpt.list_checkpoints(work, first.run_id)} == kept


def test_resume_refuses_changed_optimizer_settings_and_says_when_the_run_is_over(tmp_path, tiny_model_dir,
                                                                                 oasst1_dir, lmtune_log):
    first = _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 4})
    first.train()
    effective = (first.work_dir / f"{first.config_name}.py").read_text()
    # the checkpoint's optimizer state would keep lr=1e-3 while the dumped config said 5e-3: refused
    with pytest.raises(ConfigError, match=r"optim_wrapper\.optimizer\.lr: 0\.001 -> 0\.005.*load_from="):
        _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"resume": True}, **{"train_cfg.max_iters": 6, "lr": 5e-3})
    assert (first.work_dir / f"{first.config_name}.py").read_text() == effective
    # resuming the finished run says that nothing is left, and trains nothing
    lmtune_log.clear()
    again = _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"resume": True}, **{"train_cfg.max_iters": 4})
    assert any("nothing is left to train" in m and "max_iters" in m for m in lmtune_log), lmtune_log
    again.train()
    assert again.iter == 4 and [p.name for p in ckpt.list_checkpoints(first.work_dir)] == ["iter_2", "iter_4"]


def test_resume_looks_in_the_checkpoint_hooks_out_dir(tmp_path, tiny_model_dir, oasst1_dir):
    out = tmp_path / "checkpoints"
    first = _runner(tmp_path, tiny_model_dir, oasst1_dir,
                    **{"train_cfg.max_iters": 4, "default_hooks.checkpoint.out_dir": str(out)})
    first.train()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["iter_2", "iter_4"]
    assert not ckpt.list_checkpoints(first.work_dir)
    resumed = _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"resume": True},
                      **{"train_cfg.max_iters": 6, "default_hooks.checkpoint.out_dir": str(out)})
    assert resumed.iter == 4 and resumed.run_id == first.run_id
    resumed.train()
    with pytest.raises(ConfigError, match="--overwrite"):  # and a fresh run is refused there too
        _runner(tmp_path, tiny_model_dir, oasst1_dir, name="other",
                **{"train_cfg.max_iters": 6, "default_hooks.checkpoint.out_dir": str(out)})


def test_a_live_run_locks_its_work_dir_and_a_dead_runs_lock_is_taken_over(tmp_path, tiny_model_dir, oasst1_dir,
                                                                           lmtune_log):
    import socket

    first = _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 2})
    lock = first.work_dir / ".lmtune.lock"
    assert f"pid={os.getpid()}" in lock.read_text()
    # a second run, and a --resume, while the first lives: refused, naming the holder
    for run in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match=f"in use by a live lmtune run \\(pid {os.getpid()} on host "
                                              f"{socket.gethostname()}"):
            _runner(tmp_path, tiny_model_dir, oasst1_dir, run=run, **{"train_cfg.max_iters": 2})
    first.train()
    assert not lock.exists()  # released when the run ends
    # a lock file whose process has died (kill -9 leaves one behind) is stale: the next run takes it over
    lock.write_text("pid=999999\nhost=elsewhere\nsince=2026-01-01 00:00:00\n")
    lmtune_log.clear()
    again = _runner(tmp_path, tiny_model_dir, oasst1_dir, run={"resume": True}, **{"train_cfg.max_iters": 4})
    assert any("stale lock" in m and "pid 999999 on host elsewhere" in m for m in lmtune_log), lmtune_log
    again.train()
    assert again.iter == 4 and not lock.exists()


# ------------------------------------------------------------------ failing saves

def _disk_full_on_third_save(monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint's optimizer state
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)


def test_disk_full_stops_the_cli_run_with_a_clear_message(tmp_path, tiny_model_dir, oasst1_dir, capsys,
                                                          monkeypatch):
    _disk_full_on_third_save(monkeypatch)
    work = tmp_path / "w"
    code = main(["train", str(SEED_CFG), "--work-dir", str(work), "--cfg-options",
                 *_cli_opts(tiny_model_dir, oasst1_dir)])
    err = capsys.readouterr().err
    assert code != 0, err
    assert "saving checkpoint iter_6" in err and "No space left on device" in err and "--resume" in err, err
    assert [p.name for p in ckpt.list_checkpoints(work)] == ["iter_2", "iter_4"]
    assert ckpt.find_latest(work).name == "iter_4"
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_continue_on_error_still_fails_the_run_when_its_final_save_fails(tmp_path, tiny_model_dir, oasst1_dir,
                                                                         monkeypatch):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir,
                         **{"train_cfg.max_iters": 6, "default_hooks.checkpoint.continue_on_error": True})
    real_save, calls = torch.save, {"n": 0}

    def full_disk_after_two_saves(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_after_two_saves)
    with pytest.raises(OSError, match="saving checkpoint iter_6 .*No space left"):
        runner.train()
    assert [p.name for p in ckpt.list_checkpoints(runner.work_dir)] == ["iter_2", "iter_4"]


def test_continue_on_error_logs_and_trains_on(tmp_path, tiny_model_dir, oasst1_dir, monkeypatch, lmtune_log):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir,
                         **{"default_hooks.checkpoint.continue_on_error": True})
    _disk_full_on_third_save(monkeypatch)
    runner.train()
    assert runner.iter == runner.max_iters == 12
    names = [p.name for p in ckpt.list_checkpoints(runner.work_dir)]
    assert names == ["iter_2", "iter_4", "iter_8", "iter_10", "iter_12"]
    assert any("saving checkpoint iter_6" in m and "training continues" in m for m in lmtune_log)


# ------------------------------------------------------------------ kill -9 at random moments

def _cli_opts(model_dir, data_dir) -> list[str]:
    return [f"pretrained_model_name_or_path={model_dir}", f"data_path={data_dir}", "max_length=64",
            "train_cfg.max_epochs=None", "train_cfg.max_iters=12", "accumulative_counts=1", "save_steps=2",
            "save_total_limit=-1", "lr=1e-3",
            "model.llm.quantization_config=None", "model.llm.torch_dtype=torch.float32",
            "model.lora.lora_dropout=0.0", "optim_wrapper.dtype='float32'",
            "model.use_activation_checkpointing=False", "custom_hooks=[]", "randomness.seed=11",
            "default_hooks.logger.interval=1"]


def _loss_trace(work: Path, key: str = "loss") -> dict[int, list[float]]:
    """Every ``key`` (the training loss; ``val/loss``) logged in every run (first and resumed) of ``work``, by
    iteration."""
    trace: dict[int, list[float]] = {}
    for log in sorted(work.glob("*/scalars.jsonl")):
        lines = log.read_text().splitlines()
        for number, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                assert number == len(lines) - 1, f"{log}: line {number + 1} is damaged"
                continue  # the kill landed in the middle of the last line
            if key in row:
                trace.setdefault(row["iter"], []).append(row[key])
    return trace


# validated every 3 iterations; 'greater' on a falling loss keeps iteration 3 the best, and early stopping (patience 2)
# ends the run at iteration 9: the decisions a resumed run must take as the uninterrupted one
VALIDATION = ["val_split=4", "val_interval=3", "save_best='val/loss'", "default_hooks.checkpoint.rule='greater'",
              "early_stopping=dict(monitor='val/loss', rule='greater', patience=2, min_delta=0.0)"]


def _train_cmd(model_dir, data_dir, work: Path, resume: bool) -> list[str]:
    opts = _cli_opts(model_dir, data_dir) + VALIDATION
    return [sys.executable, "-m", "lmtune.cli", "train", str(SEED_CFG), "--work-dir", str(work),
            *(["--resume"] if resume else []), "--cfg-options", *opts]


def _env(slow: float = 0.0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ckpt.SLOW_SAVE_ENV, None)
    if slow:
        env[ckpt.SLOW_SAVE_ENV] = str(slow)
    return env


def test_kill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_model_dir, oasst1_dir):
    rng = random.Random(1234)
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(tiny_model_dir, oasst1_dir, reference, False), env=_env(), check=True,
                   capture_output=True, timeout=120)
    final = ckpt.find_latest(reference)
    assert final.name == "iter_9"  # stopped early
    assert (reference / "best_checkpoint").read_text().strip() == "iter_3"
    from safetensors.torch import load_file

    expected = load_file(str(final / ckpt.WEIGHTS))
    expected_trace, expected_val = _loss_trace(reference), _loss_trace(reference, "val/loss")
    assert sorted(expected_trace) == list(range(1, 10)) and sorted(expected_val) == [3, 6, 9]

    for trial in range(2):  # killed at a random moment of training, then inside a save
        work = tmp_path / f"trial{trial}"
        during_save = trial == 1
        # slow saves (a test hook) so that the kill can land inside one
        proc = subprocess.Popen(_train_cmd(tiny_model_dir, oasst1_dir, work, False), env=_env(0.1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if during_save:  # a save is in progress (its temporary directory exists) after one completed
                if list(work.glob(".iter_*.tmp")) and list(work.glob("iter_*")):
                    break
            elif list(work.glob("*/scalars.jsonl")):  # training has begun
                time.sleep(rng.uniform(0.0, 1.5))
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in work.glob("iter_*"):  # whatever the kill left: never an incomplete checkpoint
            assert ckpt.verify_checkpoint(path) is None, path
        for _ in range(3):
            if ckpt.find_latest(work) is not None and ckpt.find_latest(work).name == final.name:
                break
            done = subprocess.run(_train_cmd(tiny_model_dir, oasst1_dir, work, True), env=_env(),
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
        for path in work.glob("iter_*"):
            assert ckpt.verify_checkpoint(path) is None, path
        got = load_file(str(ckpt.find_latest(work) / ckpt.WEIGHTS))
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"trial {trial}: {name}")
        # the loss of every iteration, in the killed run and in each resumed one (iterations after the
        # last checkpoint run twice), equals the uninterrupted run's
        trace = _loss_trace(work)
        assert sorted(trace) == sorted(expected_trace), f"trial {trial}: iterations {sorted(trace)}"
        for it, losses in trace.items():
            for loss in losses:
                assert abs(loss - expected_trace[it][0]) <= 1e-6, f"trial {trial}, iter {it}: {losses}"
        # the validations, the best checkpoint and the early stop decided alike
        for it, losses in _loss_trace(work, "val/loss").items():
            assert all(abs(loss - expected_val[it][0]) <= 1e-6 for loss in losses), f"trial {trial}, val {it}"
        assert (work / "best_checkpoint").read_text().strip() == "iter_3", f"trial {trial}"


# ------------------------------------------------------------------ stopping on a signal

def _long_run_cmd(model_dir, data_dir, work: Path, iters: int, *flags: str) -> list[str]:
    opts = [o for o in _cli_opts(model_dir, data_dir) if not o.startswith(("train_cfg.max_iters", "save_steps"))]
    return [sys.executable, "-m", "lmtune.cli", "train", str(SEED_CFG), "--work-dir", str(work), *flags,
            "--cfg-options", *opts, f"train_cfg.max_iters={iters}", "save_steps=1000"]


def _stop_with(signum, work: Path, model_dir, data_dir, iters: int) -> tuple[Path, str]:
    """Start a run, send ``signum`` once it trains; the checkpoint it saved and what it printed."""
    proc = subprocess.Popen(_long_run_cmd(model_dir, data_dir, work, iters), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_logged_iterations(work, proc, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-2000:]
    stopped = ckpt.find_latest(work)
    step = int(stopped.name.split("_")[1])
    assert 3 <= step < iters and ckpt.verify_checkpoint(stopped) is None
    assert f"stopped by {signum.name} after iteration {step}; checkpoint {stopped} saved" in err, err[-2000:]
    return stopped, err


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_to_the_uninterrupted_run(tmp_path,
                                                                                              tiny_model_dir,
                                                                                              oasst1_dir):
    import shlex

    from safetensors.torch import load_file

    iters = 60
    reference = tmp_path / "reference"
    assert main(_long_run_cmd(tiny_model_dir, oasst1_dir, reference, iters)[3:]) == 0  # in-process: the same run
    work = tmp_path / "stopped"
    _, err = _stop_with(signal.SIGTERM, work, tiny_model_dir, oasst1_dir, iters)  # a real process, a real signal
    command = err.split("Continue with:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("lmtune train ") and command.endswith(" --resume"), command
    assert main(shlex.split(command)[1:]) == 0
    expected = load_file(str(reference / f"iter_{iters}" / ckpt.WEIGHTS))
    got = load_file(str(work / f"iter_{iters}" / ckpt.WEIGHTS))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


class SignalAt:
    """Sends this process ``signum`` after iteration ``at`` (a real signal to a real run, in-process);
    with ``again``, a second one that many seconds later, from another thread."""

    priority = "VERY_LOW"

    def __init__(self, signum, at: int, again: float | None = None) -> None:
        self.signum, self.at, self.again = signum, at, again

    def __getattr__(self, name):  # every other hook point: nothing
        return lambda *args, **kwargs: None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.at:
            os.kill(os.getpid(), self.signum)
            if self.again is not None:
                import threading

                threading.Timer(self.again, os.kill, (os.getpid(), self.signum)).start()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_a_first_ctrl_c_and_slurms_usr1_warning_stop_the_same_way(tmp_path, tiny_model_dir, oasst1_dir, signum):
    from lmtune.engine.runner.stop import RunStopped

    runner = _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 1000, "save_steps": 1000})
    runner.hooks.append(SignalAt(signum, at=3))
    with pytest.raises(RunStopped) as stopped:
        runner.train()
    assert stopped.value.signal_name == signum.name and stopped.value.iteration == 3
    assert stopped.value.checkpoint == runner.work_dir / "iter_3" and ckpt.find_latest(runner.work_dir).name == "iter_3"
    assert signal.getsignal(signum) is not None and not runner.stop_requests._previous  # handlers restored


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, tiny_model_dir, oasst1_dir, monkeypatch):
    # slow saves (a test hook) keep the stop's save running while the second Ctrl-C arrives
    monkeypatch.setenv(ckpt.SLOW_SAVE_ENV, "3")
    runner = _runner(tmp_path, tiny_model_dir, oasst1_dir, **{"train_cfg.max_iters": 1000, "save_steps": 1000})
    runner.hooks.append(SignalAt(signal.SIGINT, at=3, again=1.0))
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    assert not ckpt.list_checkpoints(runner.work_dir) and not list(runner.work_dir.glob(".iter_*"))
