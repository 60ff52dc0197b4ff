"""ThroughputHook: consistent tokens/s, TFLOP/s and MFU, from a config that trains."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.core.constants import IGNORE_INDEX as X
from lmtune.engine.flops import FlopCounter, count_targets, sample_lengths
from lmtune.engine.hooks import Hook, ThroughputHook
from lmtune.engine.hooks import throughput as tp
from lmtune.engine.hooks.hook import priority_value
from lmtune.engine.runner import Runner
from lmtune.engine.runner.runner import MessageHub

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def test_gpu_peaks_by_name():
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
             "NVIDIA A10": 125.0, "NVIDIA L40S": 362.0, "NVIDIA GeForce RTX 4090": 165.2,
             "NVIDIA GeForce RTX 3090": 71.0, "Tesla V100-SXM2-32GB": 125.0, "Tesla V100-PCIE-16GB": 112.0}
    for name, peak in names.items():
        assert tp.gpu_peak_tflops(name) == peak, name
    assert tp.gpu_peak_tflops("NVIDIA A10G") is None  # not an A10, not in the table: no guess
    assert tp.gpu_peak_tflops("Some Future GPU") is None


def test_cpu_matmul_is_measured():
    assert tp.measure_matmul_tflops(torch.float32, "cpu", size=256, repeats=2) > 0


# ------------------------------------------------------------------ the hook on its own

def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def fake_runner(model=None, time=None):
    hub = MessageHub()
    if time is not None:
        hub.update("time", time)
    return types.SimpleNamespace(message_hub=hub, device=torch.device("cpu"), unwrapped_model=model or tiny_model(),
                                 logger=logging.getLogger("lmtune.test"),
                                 optim_wrapper=types.SimpleNamespace(dtype=torch.float32))


def batch():
    return dict(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 0, 0]]),
                labels=torch.tensor([[X, X, 7, 8, 9, X, 11, 12, X, X]]),
                position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]))


def test_numbers_of_one_iteration_with_a_given_peak():
    runner = fake_runner(time=0.5)
    hook = ThroughputHook(peak_tflops=2e-6)
    hook.before_train(runner)
    outputs = {"loss": 1.0}
    hook.after_train_iter(runner, 0, batch(), outputs)
    flops = FlopCounter(runner.unwrapped_model).batch_flops(batch())
    expected = {"tokens_per_sec": 8 / 0.5, "tokens_per_sec_per_device": 8 / 0.5, "target_tokens_per_sec": 5 / 0.5,
                "tflops": flops / 0.5 / 1e12, "mfu": flops / 0.5 / 1e12 / 2e-6}
    for key, value in expected.items():
        assert runner.message_hub.get(key) == pytest.approx(value) == outputs[key], key
    assert hook.peak_source == "peak_tflops"


def test_several_ranks_sum_tokens_and_report_flops_per_device(monkeypatch):
    calls = []

    def all_reduce_sum(value):  # two ranks with the same batch
        calls.append(value.clone())
        return value * 2

    monkeypatch.setattr(tp, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(tp, "get_world_size", lambda: 2)
    runner = fake_runner(time=0.25)
    hook = ThroughputHook(peak_tflops=1.0)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0, batch(), {})
    flops = FlopCounter(runner.unwrapped_model).batch_flops(batch())
    assert len(calls) == 1 and calls[0].tolist() == [8.0, 5.0, flops]  # one collective per iteration
    assert runner.message_hub.get("tokens_per_sec") == pytest.approx(2 * 8 / 0.25)
    assert runner.message_hub.get("tokens_per_sec_per_device") == pytest.approx(8 / 0.25)
    assert runner.message_hub.get("tflops") == pytest.approx(flops / 0.25 / 1e12)
    # the two ranks sharing each row (sequence parallelism): the rows once, each rank half their work
    monkeypatch.setattr(tp, "sequence_parallel_size", lambda: 2)
    hook.after_train_iter(runner, 1, batch(), {})
    assert calls[1].tolist() == pytest.approx([4.0, 2.5, flops / 2])
    assert runner.message_hub.get("tokens_per_sec") == pytest.approx(8 / 0.25)
    assert runner.message_hub.get("tflops") == pytest.approx(flops / 2 / 0.25 / 1e12)


def test_own_clock_without_iter_timer_and_measured_cpu_peak(caplog):
    runner = fake_runner()
    hook = ThroughputHook(is_casual=False, hidden_size=4096, num_layers=32, vocab_size=32000, mlp_ratio=2.7,
                          use_activation_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="lmtune.test"):
        hook.before_train(runner)
    assert "hidden_size, num_layers, vocab_size, mlp_ratio ignored" in caplog.text
    assert hook.peak_source == "measured float32 matmul" and hook.peak_tflops > 0
    assert hook.counter.attention[0].causal is False and hook.counter.body.recomputed > 0
    hook.after_train_iter(runner, 0, batch(), {})
    last = hook.last
    assert last["time"] > 0 and last["tokens_per_sec"] * last["time"] == pytest.approx(8)
    assert last["mfu"] == pytest.approx(last["tflops"] / hook.peak_tflops)


def test_bad_peak_is_a_config_error():
    for bad in (0, -1.0, "989", True):
        with pytest.raises(ConfigError, match="peak_tflops"):
            ThroughputHook(peak_tflops=bad)


# ------------------------------------------------------------------ in a training run

class Recorder(Hook):
    """Runs right after ThroughputHook: keeps what it computed, and what it computed it from."""

    priority = 57

    def __init__(self, throughput: ThroughputHook) -> None:
        self.throughput = throughput
        self.rows: list[dict] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.rows.append({"hub_time": runner.message_hub.get("time"), "last": dict(self.throughput.last),
                          "hub": {k: runner.message_hub.get(k) for k in tp.KEYS}, "outputs": dict(outputs),
                          "lengths": sample_lengths(data_batch), "targets": count_targets(data_batch),
                          "numel": data_batch["input_ids"].numel()})


def test_config_with_throughput_hook_trains_and_logs_consistent_numbers(tmp_path, tiny_model_dir, oasst1_dir):
    # an XTuner-style config: the hook imported from xtuner.engine.hooks, added to custom_hooks
    config = tmp_path / "with_throughput.py"
    config.write_text(SEED_CFG.read_text() + "\nfrom xtuner.engine.hooks import ThroughputHook\n"
                      "custom_hooks = custom_hooks + [dict(type=ThroughputHook)]\n")
    cfg = Config.fromfile(config, {
        "pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir, "max_length": 96,
        "max_epochs": 1, "accumulative_counts": 2, "save_steps": 1000, "evaluation_freq": 1000,
        "evaluation_inputs": ["Say hello."], "custom_hooks.1.max_new_tokens": 4,
        "model.llm.quantization_config": None, "model.lora": None, "default_hooks.logger.interval": 1})
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    hook = next(h for h in runner.hooks if isinstance(h, ThroughputHook))
    recorder = Recorder(hook)
    runner.hooks = sorted([*runner.hooks, recorder], key=lambda h: priority_value(h.priority))
    order = [type(h).__name__ for h in runner.hooks]
    assert order.index("IterTimerHook") < order.index("ThroughputHook") < order.index("LoggerHook")
    runner.train()

    assert runner.unwrapped_model._chunked_loss_ok is True  # the run used the chunked loss
    assert len(recorder.rows) == runner.max_iters
    assert hook.peak_source.startswith("measured") and hook.peak_tflops > 0
    for row in recorder.rows:
        last, tokens = row["last"], sum(row["lengths"])
        assert last["time"] == row["hub_time"]  # IterTimerHook's time of this iteration
        assert last["tokens"] == tokens and 0 < tokens <= row["numel"]
        assert last["target_tokens"] == row["targets"] == row["outputs"]["num_tokens"]
        assert last["tokens_per_sec"] * last["time"] == pytest.approx(tokens)
        assert last["target_tokens_per_sec"] * last["time"] == pytest.approx(row["targets"])
        assert last["flops"] == hook.counter.step_flops(row["lengths"], row["targets"])
        assert last["tflops"] * 1e12 * last["time"] == pytest.approx(last["flops"])
        assert last["mfu"] == pytest.approx(last["tflops"] / hook.peak_tflops)
        assert row["hub"] == {key: last[key] for key in tp.KEYS}
        assert all(row["outputs"][key] == last[key] for key in tp.KEYS)
    logged = [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert len(logged) == runner.max_iters
    for line, row in zip(logged, recorder.rows):
        for key in ("tokens_per_sec", "tflops", "mfu"):  # what LoggerHook shows of them
            assert math.isclose(line[key], row["last"][key]), key
    console = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "tokens_per_sec: " in console and "tflops: " in console and "mfu: " in console


class BatchRecorder(Hook):
    """Keeps each iteration's non-pad tokens and time, as the loop saw them."""

    priority = 57

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.rows.append((sum(sample_lengths(data_batch)), runner.message_hub.get("time")))


def test_every_log_line_of_the_seed_config_carries_tokens_per_second_and_the_steps_tokens(tmp_path, tiny_model_dir,
                                                                                            oasst1_dir):
    # the seed config's own hooks (no ThroughputHook), logging every 3 iterations, 2 micro-batches a step,
    # and no terminal: the plain log lines of Slurm, CI or nohup
    cfg = Config.fromfile(SEED_CFG, {
        "pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir, "max_length": 64,
        "train_cfg.max_epochs": None, "train_cfg.max_iters": 9, "accumulative_counts": 2, "save_steps": 1000,
        "evaluation_freq": 1000, "model.llm.quantization_config": None, "default_hooks.logger.interval": 3,
        "pack_to_max_length": False, "batch_size": 2})
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    assert not any(isinstance(h, ThroughputHook) for h in runner.hooks)  # none on a CPU: its peak is unknown
    recorder = BatchRecorder()
    runner.hooks = sorted([*runner.hooks, recorder], key=lambda h: priority_value(h.priority))
    runner.train()
    logged = [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in logged] == [3, 6, 9]
    for row in logged:
        window = recorder.rows[row["iter"] - 3: row["iter"]]
        tokens, seconds = sum(t for t, _ in window), sum(s for _, s in window)
        assert row["tokens_per_sec"] == pytest.approx(tokens / seconds, rel=1e-9)
        assert row["tokens_per_sec"] * row["time"] * 3 == pytest.approx(tokens, rel=1e-6)
        # the window's last complete step: steps are iterations (1, 2), (3, 4), ..., (7, 8) and (9), the run's end
        ends = [0, 2, 4, 6, 8, 9]
        end = max(e for e in ends if e <= row["iter"])
        step = recorder.rows[ends[ends.index(end) - 1]: end]
        assert row["step_tokens"] == sum(t for t, _ in step)
    console = [line for line in (runner.log_dir / f"{runner.timestamp}.log").read_text().splitlines()
               if "Iter(train)" in line]
    assert len(console) == 3 and all("tokens_per_sec: " in line and "step_tokens: " in line for line in console)
