"""Several processes on this CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO through `lmtune train`.

Each run is `NPROC_PER_NODE=2 lmtune train ...`, so the re-launch under torchrun is part of
every test. Runs are tiny (4-6 iterations of a 2-layer model) and fp32 where exactness is checked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import OASST1_ROWS, wait_for_logged_iterations, write_jsonl
from safetensors.torch import load_file

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.config.config import parse_overrides
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.optim import StepSettings
from lmtune.engine.runner import Runner
from lmtune.engine.strategies import launch
from lmtune.engine.strategies.deepspeed_config import (
    builtin_deepspeed_configs,
    load_deepspeed_json,
    resolve_deepspeed_config,
)

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
HAS_DEEPSPEED = True
try:
    import deepspeed  # noqa: F401
except ImportError:
    HAS_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (extra 'deepspeed')")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dist_data")
    write_jsonl(root / "oasst1" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4)
    return str(root / "oasst1")


def _opts(model_dir: str, data_dir: str, iters: int = 4, full: bool = False, **extra) -> list[str]:
    opts = {"pretrained_model_name_or_path": model_dir, "data_path": data_dir, "max_length": 64,
            "train_cfg.max_epochs": None, "train_cfg.max_iters": iters, "accumulative_counts": 1,
            "save_steps": 2, "save_total_limit": -1, "lr": 1e-3, "model.llm.quantization_config": None,
            "model.llm.torch_dtype": "torch.float32", "optim_wrapper.dtype": "'float32'", "custom_hooks": [],
            "randomness.seed": 11, "default_hooks.logger.interval": 1, "batch_size": 1}
    if full:
        opts["model.lora"] = None
    else:
        opts["model.lora.lora_dropout"] = 0.0
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def _env(nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", NPROC_PER_NODE=str(nproc))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


def _failure_report(done: subprocess.CompletedProcess) -> str:
    """What a failed run said: the lines that name the error (a C++ abort's what(), a Python traceback's
    last line), then the tails of both streams."""
    keys = ("terminate called", "what()", "Error", "error:", "Traceback", "Signal", "enforce fail")
    lines = [line for line in done.stderr.splitlines() if any(k in line for k in keys)]
    return ("\n".join(lines[-40:]) + "\n--- stdout tail ---\n" + done.stdout[-2000:]
            + "\n--- stderr tail ---\n" + done.stderr[-3000:])


def _aborted(done: subprocess.CompletedProcess) -> bool:
    """A child killed by SIGABRT from C++ (gloo's TCP transport aborts under load now and then,
    pytorch/gloo#514), not a Python error of lmtune's: a rank that raises exits with code 1, never signal 6."""
    return done.returncode != 0 and "Signal 6 (SIGABRT)" in done.stderr


def train(work: Path, opts: list[str], *flags: str, nproc: int = 2, check: bool = True,
          timeout: float = 900, config: Path = SEED_CFG) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmtune.cli", "train", str(config), "--work-dir", str(work), *flags,
           "--cfg-options", *opts]
    # The work dir as it was before the run, so that a retry after a transport abort starts from the same state.
    before = work.with_name(work.name + ".before")
    shutil.rmtree(before, ignore_errors=True)
    if work.exists():
        shutil.copytree(work, before)
    done = subprocess.run(cmd, env=_env(nproc), capture_output=True, text=True, timeout=timeout)
    if _aborted(done):
        warnings.warn(f"a rank of `lmtune train {' '.join(flags)}` died of SIGABRT in C++; retried once:\n"
                      + _failure_report(done), stacklevel=2)
        shutil.rmtree(work, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, work)
        done = subprocess.run(cmd, env=_env(nproc), capture_output=True, text=True, timeout=timeout)
    shutil.rmtree(before, ignore_errors=True)
    if check:
        assert done.returncode == 0, _failure_report(done)
    return done


@pytest.fixture(scope="module")
def hooks_cfg(tmp_path_factory) -> Path:
    """The seed config with its chat hook and a HFCheckpointHook: both must work on sharded weights."""
    path = tmp_path_factory.mktemp("cfg") / "with_hf_hook.py"
    path.write_text(SEED_CFG.read_text() + "\nfrom lmtune.engine.hooks import HFCheckpointHook\n"
                    "custom_hooks.append(dict(type=HFCheckpointHook))\n")
    return path


def with_hooks(opts: list[str]) -> list[str]:
    return [o for o in opts if not o.startswith("custom_hooks=")] + [
        "evaluation_freq=2", "evaluation_inputs=['Hi']", "custom_hooks.1.max_new_tokens=4"]


def check_hooks(work: Path, kind: str) -> None:
    answers = [json.loads(line) for log in work.glob("*/eval_chat.jsonl") for line in log.read_text().splitlines()]
    assert [a["when"] for a in answers][:2] == ["before training", "iter 2"] and answers[-1]["when"] == "after training"
    marker = "adapter_config.json" if kind == "adapter" else "config.json"
    assert (work / "hf" / marker).is_file()


def losses(work: Path, key: str = "loss") -> dict[int, float]:
    """``key`` at each iteration that logged it (the training loss; ``val/loss``: the validation loss)."""
    out: dict[int, float] = {}
    for log in sorted(work.glob("*/scalars.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if key in row:
                out[row["iter"]] = row[key]
    return out


# a held-out split of 7 samples, packed into 3 rows: 2 on rank 0 and 1 on rank 1, so the ranks run different numbers
# of validation batches; validated before training (the model as loaded) and every 2 iterations. FSDP2 holds out one
# sample: one row, and rank 1 has none.
VALIDATION = ["val_split=7", "val_before_train=True", "val_interval=2"]


def assert_same_validation(a: Path, b: Path, rel: float) -> None:
    """Both runs logged the same validation losses (before training: the same model, so to 1e-6 in fp32)."""
    va, vb = losses(a, "val/loss"), losses(b, "val/loss")
    assert sorted(va) == sorted(vb) == [0, 2, 4], (va, vb)
    assert va[0] == pytest.approx(vb[0], rel=1e-6), (va[0], vb[0])
    for it in va:
        assert va[it] == pytest.approx(vb[it], rel=rel), (it, va[it], vb[it])


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / ckpt.WEIGHTS))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def resume_from_middle(work: Path, resumed: Path, opts: list[str], *flags: str) -> None:
    """Copy ``iter_2`` of a finished run and resume from it; the result equals the finished run."""
    resumed.mkdir()
    os.system(f"cp -r {work / 'iter_2'} {resumed}")
    train(resumed, opts, "--resume", *flags)
    assert_same_weights(weights(ckpt.find_latest(resumed)), weights(ckpt.find_latest(work)), atol=1e-6)
    first = losses(work)
    for it, value in losses(resumed).items():
        assert it > 2 and abs(value - first[it]) <= 1e-6, (it, value, first[it])


# ------------------------------------------------------------------ DDP

def test_ddp_two_ranks_equal_one_rank_with_the_doubled_batch(tmp_path, tiny_model_dir, data_dir):
    opts = _opts(tiny_model_dir, data_dir) + VALIDATION
    train(tmp_path / "two", opts, nproc=2)
    train(tmp_path / "one", opts + ["batch_size=2"], nproc=1)
    two, one = tmp_path / "two", tmp_path / "one"
    assert json.loads((ckpt.find_latest(two) / ckpt.META).read_text())["strategy"] == "ddp"
    assert_same_weights(weights(ckpt.find_latest(two)), weights(ckpt.find_latest(one)), atol=1e-5)
    # the logged loss is the mean over both ranks' tokens, as in the single process
    l2, l1 = losses(two), losses(one)
    assert sorted(l2) == sorted(l1) == [1, 2, 3, 4]
    for it in l1:
        assert abs(l2[it] - l1[it]) <= 1e-5, (it, l2[it], l1[it])
    # the validation loss of the split shared over two ranks is that of one process
    assert_same_validation(two, one, rel=1e-5)
    # resuming a DDP run continues it exactly
    resume_from_middle(two, tmp_path / "resumed", opts)


# ------------------------------------------------------------------ sequence parallelism

def test_sequence_parallel_two_ranks_equal_one_process_and_resume(tmp_path, tiny_model_dir, data_dir):
    """sequence_parallel_size=2 on 2 ranks: each packed row (of any length: padded to even) is split over both,
    the attention reaches the whole row through the Ulysses exchange; the losses and the LoRA weights are those of
    one process on the same rows, under DDP and under ZeRO-3 (with XTuner's use_varlen_attn and
    SequenceParallelSampler, as its sequence-parallel configs have them), and a resumed run continues it exactly."""
    opts = _opts(tiny_model_dir, data_dir)
    sp = opts + ["sequence_parallel_size=2"]
    train(tmp_path / "one", opts, nproc=1)
    xtuner_style = ["use_varlen_attn=True",
                    "train_dataloader.sampler.type=lmtune.compat.xtuner.parallel.sequence.SequenceParallelSampler"]
    for work, flags, extra in [(tmp_path / "sp", (), []),
                               (tmp_path / "zero3", ("--deepspeed", "deepspeed_zero3"), xtuner_style)]:
        if flags and not HAS_DEEPSPEED:
            continue
        done = train(work, sp + extra, *flags, nproc=2)
        assert "Sequence parallelism: each row split over 2 ranks, 1 data-parallel group(s)" in done.stdout
        assert_same_weights(weights(ckpt.find_latest(work)), weights(ckpt.find_latest(tmp_path / "one")), atol=1e-5)
        ls, l1 = losses(work), losses(tmp_path / "one")
        assert sorted(ls) == sorted(l1) == [1, 2, 3, 4]
        for it in l1:
            assert abs(ls[it] - l1[it]) <= 1e-5, (flags, it, ls[it], l1[it])
    resume_from_middle(tmp_path / "sp", tmp_path / "resumed", sp)


# ------------------------------------------------------------------ FSDP2

def test_fsdp2_full_finetuning_trains_resumes_and_converts(tmp_path, tiny_model_dir, data_dir, hooks_cfg):
    from transformers import AutoModelForCausalLM

    from lmtune.engine.checkpoint.export import pth_to_hf

    # the same loss path on both sides (FSDP2 uses the plain loss: its output head is sharded)
    opts = _opts(tiny_model_dir, data_dir, full=True, accumulative_counts=2, **{"model.loss_chunk_size": 0})
    opts += ["val_split=1", *VALIDATION[1:]]
    work = tmp_path / "fsdp"
    train(work, with_hooks(opts), "--strategy", "fsdp2", config=hooks_cfg)
    check_hooks(work, "model")  # generation and export work on sharded weights
    latest = ckpt.find_latest(work)
    assert sorted(p.name for p in latest.glob("optimizer*")) == ["optimizer.rank0.pt", "optimizer.rank1.pt"]
    # sharded training equals one process with the doubled batch
    train(tmp_path / "one", opts + ["batch_size=2"], nproc=1)
    assert_same_weights(weights(latest), weights(ckpt.find_latest(tmp_path / "one")), atol=1e-5)
    assert_same_validation(work, tmp_path / "one", rel=1e-5)  # sharded weights, uneven batches per rank
    resume_from_middle(work, tmp_path / "resumed", opts, "--strategy", "fsdp2")

    # the sharded optimizer state resumes with the same number of processes only, and says so
    other = tmp_path / "other"
    other.mkdir()
    os.system(f"cp -r {work / 'iter_2'} {other}")
    done = train(other, opts, "--resume", "--strategy", "fsdp2", nproc=1, check=False)
    assert done.returncode == 2 and "sharded over 2 processes" in done.stderr, done.stderr[-2000:]

    out = pth_to_hf(None, latest, tmp_path / "hf", fp32=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    state = weights(latest)
    torch.testing.assert_close(model.model.embed_tokens.weight, state["llm.model.embed_tokens.weight"])


# ------------------------------------------------------------------ DeepSpeed

@needs_deepspeed
# ZeRO-2/3 and one offload variant (ZeRO-2 with offload was checked by hand: it resumes bit-exactly too). ZeRO-1 runs
# DeepSpeed's ZeRO-2 optimizer class with unsharded gradients, and lmtune tells apart only ZeRO-3 from the other
# stages, so ZeRO-1 is checked by hand (it trains, resumes and converts: the 2026-12-04 run) rather than here.
@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_trains_saves_resumes_and_converts(tmp_path, tiny_model_dir, data_dir, hooks_cfg, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.engine.checkpoint.export import pth_to_hf

    opts = _opts(tiny_model_dir, data_dir, iters=6, lr=1e-2)
    work = tmp_path / "work"
    if name == "deepspeed_zero3":
        opts += VALIDATION
        done = train(work, with_hooks(opts), "--deepspeed", name, config=hooks_cfg)
        check_hooks(work, "adapter")
        assert "ZeRO-3: 21 of 49 weights were sharded as they loaded" in done.stdout  # frozen base + LoRA added later
        # validation over sharded weights, the ranks running uneven batches: before training (LoRA's B is zero:
        # the base model) it is the loss one process computes
        single = Runner.from_config(Config.fromfile(SEED_CFG, parse_overrides(opts)), work_dir=str(tmp_path / "one"))
        assert losses(work, "val/loss")[0] == pytest.approx(single.val_loop.run()["val/loss"], rel=1e-6)
        assert sorted(losses(work, "val/loss")) == [0, 2, 4, 6]
    else:
        train(work, opts, "--deepspeed", name)
    trace = losses(work)
    assert sorted(trace) == list(range(1, 7))
    assert (trace[5] + trace[6]) / 2 < (trace[1] + trace[2]) / 2, trace  # it learns
    meta = json.loads((ckpt.find_latest(work) / ckpt.META).read_text())
    assert meta["strategy"] == "deepspeed" and meta["world_size"] == 2
    state = weights(ckpt.find_latest(work))
    assert state and all("lora_" in k for k in state)
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    resume_from_middle(work, tmp_path / "resumed", opts, "--deepspeed", name)

    adapter = pth_to_hf(None, ckpt.find_latest(work), tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and len(saved) == len(state)  # the adapter holds the trained (gathered) values
    assert sorted(float(v.double().sum()) for v in saved.values()) == pytest.approx(
        sorted(float(v.double().sum()) for v in state.values()))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())

    if name == "deepspeed_zero2":  # a DeepSpeed checkpoint's optimizer state resumes under DeepSpeed only
        done = train(tmp_path / "plain", opts, "--resume", str(ckpt.find_latest(work)), nproc=1, check=False)
        assert done.returncode == 2 and "saved under deepspeed" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------ DeepSpeed config rules

def _optim(**optim) -> dict:
    from lmtune.engine.optim import AmpOptimWrapper

    return {"type": AmpOptimWrapper, "accumulative_counts": 8, "dtype": "float16", "clip_grad": {"max_norm": 1.0},
            **optim}


def _resolve(config, optim: dict, world_size: int = 1) -> tuple[dict, str]:
    """The DeepSpeed config a run would use, with batch size 4 and the optimizer wrapper ``optim``."""
    raw, source = load_deepspeed_json(config)
    ds = resolve_deepspeed_config(raw, source, 4, StepSettings.from_config(optim), torch.device("cpu"), world_size)
    return ds, source


def test_builtin_deepspeed_configs_are_shipped():
    assert set(builtin_deepspeed_configs()) == {"deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload",
                                                "deepspeed_zero3", "deepspeed_zero3_offload"}


def test_lmtune_config_wins_over_the_json(tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto",
                                "gradient_clipping": 0.5, "bf16": {"enabled": False}, "fp16": {"enabled": True},
                                "optimizer": {"type": "Adam"},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with caplog.at_level("WARNING", logger="lmtune"):
        ds, source = _resolve(str(path), _optim(), world_size=2)
    assert source == str(path)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 4 * 8 * 2
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False  # bf16 on the CPU
    assert "optimizer" not in ds and ds["zero_optimization"] == {"stage": 2}
    text = caplog.text
    for key in ("train_micro_batch_size_per_gpu=16", "gradient_clipping=0.5", "bf16.enabled=False",
                "fp16.enabled=True", "'optimizer' section is ignored"):
        assert key in text, key
    assert "gradient_accumulation_steps" not in text  # "auto" is filled in silently


def test_deepspeed_precision_and_bad_input(tmp_path):
    from lmtune.engine.optim import OptimWrapper

    ds, _ = _resolve("deepspeed_zero3", _optim(type=OptimWrapper))
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # a plain OptimWrapper trains in fp32
    assert ds["gradient_clipping"] == 1.0
    ds, _ = _resolve("deepspeed_zero2_offload", {})
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match="deepspeed_zero2"):
        _resolve("deepspeed_zero", _optim())
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ConfigError, match=r"bad.json, line 2"):
        _resolve(str(bad), _optim())


def test_accumulation_is_read_once_with_one_check(tmp_path, data_dir):
    """accumulative_counts=0 is the same error for the optimizer wrapper, DeepSpeed's JSON and `lmtune check`
    (it used to raise in one and become 1 in the others)."""
    from lmtune.engine.optim import OptimWrapper
    from lmtune.tools.check import check_config

    message = "accumulative_counts must be a positive integer"
    with pytest.raises(ConfigError, match=message):
        OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), accumulative_counts=0)
    with pytest.raises(ConfigError, match=message):
        _resolve("deepspeed_zero2", _optim(accumulative_counts=0))
    from lmtune.config import Config

    cfg = Config.fromfile(SEED_CFG, {"data_path": data_dir, "accumulative_counts": 0})
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, io.StringIO(), deepspeed="deepspeed_zero2")
    # a float32 AmpOptimWrapper trains in fp32 under DeepSpeed too
    ds, _ = _resolve("deepspeed_zero2", _optim(dtype="float32"))
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@needs_deepspeed
def test_zero3_adapts_a_copy_of_the_model_config():
    from lmtune.engine.strategies import DeepSpeedStrategy, Strategy

    quant = {"type": "BitsAndBytesConfig", "load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float16}
    model_cfg = {"type": "SupervisedFinetune", "llm": {"type": "AutoModel", "quantization_config": quant}}
    adapted = DeepSpeedStrategy(torch.device("cpu"), "deepspeed_zero3").model_config(model_cfg)
    assert adapted["llm"]["quantization_config"]["bnb_4bit_quant_storage"] == torch.float16
    assert "bnb_4bit_quant_storage" not in quant  # the user's dict is not edited
    assert DeepSpeedStrategy(torch.device("cpu"), "deepspeed_zero2").model_config(model_cfg) is model_cfg
    assert Strategy(torch.device("cpu")).model_config(model_cfg) is model_cfg
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        DeepSpeedStrategy(torch.device("cpu"), {"zero_optimization": {"stage": "auto"}})


def test_is_sharded_knows_dtensors_and_zero3_parameters():
    from lmtune.core.dist import is_sharded

    plain = torch.nn.Parameter(torch.zeros(2))
    assert not is_sharded(plain) and not is_sharded(torch.zeros(2))
    plain.ds_id = 3  # what ZeRO-3 marks its parameters with
    assert is_sharded(plain)


# ------------------------------------------------------------------ launching

def test_slurm_environment_mapping():
    assert launch.expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert launch.expand_nodelist("a1") == ["a1"]
    env = launch.slurm_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                    "SLURM_NODELIST": "gpu-[3-4]", "PORT": "29811"})
    assert env == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-3",
                   "MASTER_PORT": "29811"}
    with pytest.raises(ConfigError, match="srun"):
        launch.slurm_environment({"SLURM_PROCID": "0"})


def test_torchrun_command_from_the_environment():
    cmd = launch.torchrun_command(["train", "cfg.py"], {"NPROC_PER_NODE": "8"})
    assert cmd[:3] == [sys.executable, "-m", "lmtune.engine.strategies.agent"]  # torchrun's agent, run by lmtune
    assert "--nproc_per_node=8" in cmd and "--nnodes=1" in cmd and cmd[-4:] == ["train", "cfg.py", "--launcher",
                                                                               "pytorch"]
    assert any(a.startswith("--master_port=") and int(a.split("=")[1]) > 0 for a in cmd)
    multi = launch.torchrun_command(["train"], {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1",
                                                "ADDR": "10.0.0.1", "PORT": "29500"})
    assert "--node_rank=1" in multi and "--master_addr=10.0.0.1" in multi and "--master_port=29500" in multi
    with pytest.raises(ConfigError, match="ADDR"):
        launch.torchrun_command(["train"], {"NNODES": "2", "PORT": "1"})
    with pytest.raises(ConfigError, match="NODE_RANK"):
        launch.torchrun_command(["train"], {"NNODES": "2", "NODE_RANK": "2", "ADDR": "x", "PORT": "1"})
    assert not launch.wants_relaunch("none", {"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"})  # already a worker
    assert launch.wants_relaunch("none", {"NPROC_PER_NODE": "2"})
    assert not launch.wants_relaunch("slurm", {"NPROC_PER_NODE": "2"})


def test_slurm_launcher_runs_one_task(tmp_path, tiny_model_dir, data_dir):
    env = _env(1)
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NODELIST="localhost",
               MASTER_PORT=str(launch.free_port()))
    cmd = [sys.executable, "-m", "lmtune.cli", "train", str(SEED_CFG), "--work-dir", str(tmp_path / "w"),
           "--launcher", "slurm", "--cfg-options", *_opts(tiny_model_dir, data_dir, iters=2)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt.find_latest(tmp_path / "w").name == "iter_2"


FAILING_HOOK = '''

from lmtune.engine.hooks import Hook


class FailOnRankOne(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        import torch.distributed as dist

        from lmtune.core.errors import UserError

        if dist.get_rank() == 1 and runner.iter == 1:
            raise UserError("rank 1 fails on purpose")


custom_hooks = [dict(type=FailOnRankOne)]
'''


def test_a_failing_rank_ends_the_run_promptly(tmp_path, tiny_model_dir, data_dir):
    config = tmp_path / "failing.py"
    config.write_text(SEED_CFG.read_text() + FAILING_HOOK)
    opts = [o for o in _opts(tiny_model_dir, data_dir, iters=50) if not o.startswith("custom_hooks")]
    cmd = [sys.executable, "-m", "lmtune.cli", "train", str(config), "--work-dir", str(tmp_path / "w"),
           "--cfg-options", *opts]
    # the other rank waits in a collective whose timeout is 30 min: the run must end long before (it takes
    # about 20 s on an idle 2-core machine, torchrun stopping the waiting rank), whatever the machine's load
    done = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=1200)
    # one clear message, from the rank it happened on, with the exit code of a user error in one process (2);
    # no torchrun traceback or failure table
    assert done.returncode == 2, _failure_report(done)
    assert [line for line in done.stderr.splitlines() if "fails on purpose" in line] == [
        "(rank 1) lmtune: error: rank 1 fails on purpose"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]


# ------------------------------------------------------------------ a ported hub-code family (InternLM2)

@needs_deepspeed
@pytest.mark.parametrize("engine", ["deepspeed_zero3", "fsdp2"])
def test_a_hub_layout_internlm2_trains_sharded_resumes_and_exports_in_its_layout(tmp_path, data_dir, engine):
    from hub_models import internlm2_dir

    from lmtune.engine.checkpoint.export import pth_to_hf

    hub_dir = internlm2_dir(tmp_path / "hub")
    opts = _opts(str(hub_dir), data_dir, full=True, lr=1e-2) + ["model.llm.trust_remote_code=True"]
    flags = ("--deepspeed", engine) if engine.startswith("deepspeed") else ("--strategy", engine)
    work = tmp_path / "work"
    done = train(work, opts, *flags)
    if engine == "deepspeed_zero3":
        assert "ZeRO-3:" in done.stdout and "weights were sharded as they loaded" in done.stdout
    assert sorted(losses(work)) == [1, 2, 3, 4]
    if engine == "deepspeed_zero3":  # the port's weights resume by their names (FSDP2's resume: the Llama test)
        resume_from_middle(work, tmp_path / "resumed", opts, *flags)
    out = pth_to_hf(None, ckpt.find_latest(work), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "internlm2"
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(hub_dir / "model.safetensors")))


# ------------------------------------------------------------------ signals, a dead launcher, one answer

def _start(work: Path, opts: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmtune.cli", "train", str(SEED_CFG), "--work-dir", str(work), "--cfg-options", *opts]
    return subprocess.Popen(cmd, env=_env(nproc), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _gone(pids: list[int], limit: float = 900) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_sigterm_to_a_two_rank_run_saves_on_every_rank_and_exits_75(tmp_path, tiny_model_dir, data_dir):
    work = tmp_path / "w"
    proc = _start(work, _opts(tiny_model_dir, data_dir, iters=400, save_steps=1000))
    wait_for_logged_iterations(work, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 75, err[-3000:]
    saved = ckpt.find_latest(work)
    assert saved is not None and ckpt.verify_checkpoint(saved) is None
    assert err.count("stopped by SIGTERM") == 1 and "--resume" in err, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]


@pytest.mark.parametrize("victim", ["launcher", "agent"])
def test_workers_end_when_their_launcher_dies(tmp_path, tiny_model_dir, data_dir, victim):
    from lmtune.engine.strategies.supervise import descendants

    work = tmp_path / "w"
    proc = _start(work, _opts(tiny_model_dir, data_dir, iters=100000, save_steps=1000))
    wait_for_logged_iterations(work, proc, 2)
    tree = descendants(proc.pid)
    agent = next(p for p in tree if "lmtune.engine.strategies.agent" in Path(f"/proc/{p}/cmdline").read_text())
    workers = descendants(agent)
    assert len(workers) >= 2
    os.kill(proc.pid if victim == "launcher" else agent, signal.SIGKILL)
    proc.wait(timeout=60)
    assert _gone(workers), f"workers still running after the {victim} was killed"
    # they were told to stop (SIGTERM), so they saved on the way out
    assert ckpt.find_latest(work) is not None


def test_the_agent_answers_once_for_all_ranks():
    from lmtune.engine.strategies.supervise import answer

    same = "lmtune: error: max_length must be at least 2"
    everywhere = [{"rank": 1, "code": 2, "message": same, "time": 1.0}, {"rank": 0, "code": 2, "message": same,
                                                                         "time": 2.0}]
    assert answer(everywhere, 75) == (2, same)  # the same error on every rank: said once, as one process says it
    lost_peer = [{"rank": 1, "code": 2, "message": "lmtune: error: bad row 7", "time": 1.0},
                 {"rank": 0, "code": 1, "message": "lmtune: RuntimeError: connection closed", "time": 2.0}]
    assert answer(lost_peer, 75) == (2, "(rank 1) lmtune: error: bad row 7")  # the cause, not its echo
    stopped = [{"rank": 1, "code": 75, "message": "", "time": 1.0},
               {"rank": 0, "code": 75, "message": "lmtune: stopped by SIGTERM ...", "time": 2.0}]
    assert answer(stopped, 75) == (75, "lmtune: stopped by SIGTERM ...")
    assert answer([], 75) is None


def test_the_agent_knows_a_stop_signal_behind_torchs_own_error():
    """A SIGTERM that lands on the first line of torch's metrics wrapper surfaces as an UnboundLocalError raised
    while handling the SignalException; the agent still reads it as the stop it is (seen once in a suite run)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from lmtune.engine.strategies.agent import stopping_signal

    def wrapper():
        try:
            raise SignalException("got signal: 15", sigval=signal.SIGTERM)  # the signal, before `start` is bound
            start = time.time()
        finally:
            print(time.time() - start)  # as torch's wrapper reads it
    with pytest.raises(UnboundLocalError) as caught:
        wrapper()
    assert stopping_signal(caught.value, SignalException) == 15
    assert stopping_signal(SignalException("x", sigval=signal.SIGINT), SignalException) == 2
    assert stopping_signal(ValueError("a real failure"), SignalException) is None


# ------------------------------------------------------------------ preference training

def test_orpo_two_ranks_equal_one_rank_with_the_doubled_batch(tmp_path):
    # ORPO divides its two terms by different totals (pairs, chosen tokens): both must be the step's, over ranks
    from test_preference import FIXTURE, PREFERENCE_CONFIG, mix_rows, preference_run, write_pairs

    data = write_pairs(tmp_path / "mix.jsonl", mix_rows())
    cfg = tmp_path / "orpo.py"
    cfg.write_text(PREFERENCE_CONFIG.format(path=str(FIXTURE / "policy"), data=data, model="ORPO"))
    train(tmp_path / "two", ["batch_size=2", "max_iters=2"], "--seed", "3", config=cfg, nproc=2)
    one, rows_one = preference_run(tmp_path, "one", "ORPO", batch_size=4, max_iters=2)  # seed 3 as well
    two = tmp_path / "two"
    assert json.loads((ckpt.find_latest(two) / ckpt.META).read_text())["strategy"] == "ddp"
    assert_same_weights(weights(ckpt.find_latest(two)), weights(ckpt.find_latest(one.work_dir)), atol=1e-6)
    rows_two = [json.loads(line) for log in sorted(two.glob("*/scalars.jsonl"))
                for line in log.read_text().splitlines()]
    for a, b in zip(rows_two, rows_one, strict=True):  # the logged loss and rewards are over both ranks' pairs
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
