"""End to end: XTuner's five-part config trains with QLoRA, LoRA and full fine-tuning; every Part 1
setting reaches the component it configures; exactness of accumulation, schedules and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.runner import Runner

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def seed_overrides(model_dir: str, data_dir: str, **extra) -> dict:
    """What a user edits to point the spec's config at a local model and data."""
    base = dict(pretrained_model_name_or_path=model_dir, data_path=data_dir, max_length=96, max_epochs=1,
                accumulative_counts=2, save_steps=4, evaluation_freq=4, lr=1e-2,
                evaluation_inputs=["Say hello."])
    base.update(extra)
    return base


def make_runner(tmp_path, model_dir, data_dir, nested: dict | None = None, **extra) -> Runner:
    cfg = Config.fromfile(SEED_CFG, {**seed_overrides(model_dir, data_dir, **extra),
                                     "custom_hooks.1.max_new_tokens": 6, **(nested or {})})
    return Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scalars(runner: Runner) -> list[dict]:
    return read_jsonl(runner.log_dir / "scalars.jsonl")


# ------------------------------------------------------------------ fine-tuning modes

@pytest.mark.parametrize("mode", ["qlora", "qlora-bf16", "qlora-fp32", "lora", "full"])
def test_seed_config_trains_in_every_mode(tmp_path, tiny_model_dir, oasst1_dir, mode):
    nested = {}
    if mode == "qlora-bf16":
        nested["model.llm.quantization_config.bnb_4bit_compute_dtype"] = torch.bfloat16
    if mode == "qlora-fp32":
        nested["model.llm.quantization_config.bnb_4bit_compute_dtype"] = torch.float32
        nested["model.llm.torch_dtype"] = torch.float32
    if mode in ("lora", "full"):
        nested["model.llm.quantization_config"] = None
    if mode == "full":
        nested["model.lora"] = None
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, nested={**nested, "default_hooks.logger.interval": 1})
    model = runner.unwrapped_model
    if mode.startswith("qlora"):
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.use_lora == (mode != "full")
    runner.train()

    work = runner.work_dir
    latest = ckpt.find_latest(work)
    assert latest is not None and latest.name == f"iter_{runner.max_iters}"
    weights = ckpt.load_checkpoint(latest)["weights"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(weights) == trainable
    if mode != "full":
        assert all("lora_" in n for n in weights)
    else:
        assert len(weights) == len(list(model.parameters()))
    logged = scalars(runner)
    assert len(logged) == runner.max_iters and all(math.isfinite(s["loss"]) for s in logged)
    answers = read_jsonl(runner.log_dir / "eval_chat.jsonl")
    assert [a["when"] for a in answers][0] == "before training"
    assert answers[-1]["when"] == "after training"
    # the effective config is dumped and loads back
    dumped = Config.fromfile(work / f"{SEED_CFG.stem}.py")
    assert dumped.pretrained_model_name_or_path == tiny_model_dir


def test_loss_falls(tmp_path, tiny_model_dir, oasst1_dir):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, max_epochs=6, accumulative_counts=1,
                         nested={"model.llm.quantization_config": None, "model.lora": None,
                                 "default_hooks.logger.interval": 1},
                         lr=3e-3, evaluation_freq=1000, save_steps=1000)
    runner.train()
    losses = [s["loss"] for s in scalars(runner)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_no_4bit_backend_stops_with_one_sentence(tmp_path, tiny_model_dir, oasst1_dir, monkeypatch):
    import bitsandbytes.functional as F

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", broken)
    with pytest.raises(ConfigError) as err:
        make_runner(tmp_path, tiny_model_dir, oasst1_dir)
    message = str(err.value)
    assert "4-bit" in message and "quantization_config=None" in message
    assert ckpt.list_checkpoints(tmp_path / "work") == []


# ------------------------------------------------------------------ Part 1 settings take effect

def test_every_part1_setting_reaches_its_component(tmp_path, tiny_model_dir, oasst1_dir):
    from torch.optim import Adam

    from lmtune.dataset.templates import PROMPT_TEMPLATE
    from lmtune.engine.hooks import CheckpointHook, EvaluateChatHook

    runner = make_runner(
        tmp_path, tiny_model_dir, oasst1_dir,
        nested={"model.llm.quantization_config": None},
        use_varlen_attn=True, prompt_template=PROMPT_TEMPLATE.qwen_chat, max_length=40,
        pack_to_max_length=False, batch_size=2, accumulative_counts=3, dataloader_num_workers=1, max_epochs=2,
        optim_type=Adam, lr=0.05, betas=(0.5, 0.6), weight_decay=0.01, max_norm=0.25, warmup_ratio=0.5,
        save_steps=7, save_total_limit=5, evaluation_freq=9, SYSTEM="Be brief.",
        evaluation_inputs=["one", "two"])
    loader = runner.train_dataloader
    assert runner.unwrapped_model.llm.get_base_model().config._name_or_path == tiny_model_dir
    assert loader.batch_size == 2 and loader.num_workers == 1
    rows = [loader.dataset[i] for i in range(len(loader.dataset))]
    assert all(len(r["input_ids"]) <= 40 for r in rows) and "num_tokens" not in loader.dataset.column_names
    assert runner.optim_wrapper.accumulative_counts == 3
    assert type(runner.optim_wrapper.optimizer) is Adam
    group = runner.optim_wrapper.param_groups[0]
    assert group["initial_lr"] == 0.05 and group["weight_decay"] == 0.01 and group["betas"] == (0.5, 0.6)
    assert runner.optim_wrapper.clip_grad["max_norm"] == 0.25
    assert runner.max_epochs == 2
    warmup, cosine = runner.param_schedulers
    assert warmup.end == int(0.5 * 2 * len(loader)) == cosine.begin and cosine.end == 2 * len(loader)
    ck = next(h for h in runner.hooks if isinstance(h, CheckpointHook))
    assert (ck.interval, ck.max_keep_ckpts) == (7, 5)
    chat = next(h for h in runner.hooks if isinstance(h, EvaluateChatHook))
    assert chat.every_n_iters_ == 9 and chat.system == "Be brief." and chat.inputs == ["one", "two"]
    assert chat.session(None).prompt_text("one").startswith("<|im_start|>system\nBe brief.")
    batch = next(iter(loader))
    assert "cumulative_len" in batch  # use_varlen_attn reaches the collate function
    assert runner.unwrapped_model.use_varlen_attn
    assert runner.cfg.tokenizer.pretrained_model_name_or_path == tiny_model_dir
    # the template reaches the data: the first row is ChatML with the system-less instruction
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.decode(rows[0]["input_ids"]).startswith("<|im_start|>user\n")


def test_betas_and_packing_reach_adamw(tmp_path, tiny_model_dir, oasst1_dir):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, nested={"model.llm.quantization_config": None},
                         betas=(0.8, 0.95), max_length=64)
    assert runner.optim_wrapper.param_groups[0]["betas"] == (0.8, 0.95)
    rows = runner.train_dataloader.dataset
    assert "num_tokens" in rows.column_names
    assert all(sum(r["num_tokens"]) == len(r["input_ids"]) <= 64 for r in rows)


# ------------------------------------------------------------------ exactness

def _full_runner(tmp_path, tiny_model_dir, data_dir, name, resume=None, **extra):
    nested = {"model.llm.quantization_config": None, "model.lora": None, "model.llm.torch_dtype": torch.float32,
              "optim_wrapper.dtype": "float32", "model.use_activation_checkpointing": False,
              "custom_hooks": [], "default_hooks.logger.interval": 1}
    nested.update(extra.pop("nested", {}))
    cfg = Config.fromfile(SEED_CFG, {**seed_overrides(tiny_model_dir, data_dir, **extra), **nested})
    return Runner.from_config(cfg, work_dir=str(tmp_path / name), seed=3, resume=resume)


def test_accumulation_equals_one_large_batch(tmp_path, tiny_model_dir, oasst1_dir):
    """4 accumulated micro-batches of 1 give the update of one batch of 4 (same rows, fp32)."""
    from torch.optim import SGD

    common = dict(optim_type=SGD, lr=1.0, max_norm=1e9, pack_to_max_length=False, warmup_ratio=0.0,
                  save_steps=1000)
    large = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "large", batch_size=4, accumulative_counts=1,
                         nested={"train_cfg.max_epochs": None, "train_cfg.max_iters": 1, "param_scheduler": None},
                         **common)
    small = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "small", batch_size=1, accumulative_counts=4,
                         nested={"train_cfg.max_epochs": None, "train_cfg.max_iters": 4, "param_scheduler": None,
                                 "default_hooks.logger.interval": 4},
                         **common)
    before = {n: p.detach().clone() for n, p in small.unwrapped_model.named_parameters()}
    for n, p in large.unwrapped_model.named_parameters():
        assert torch.equal(p, before[n])
    small.train()
    large.train()
    changed = 0
    for (n, a), (_, b) in zip(small.unwrapped_model.named_parameters(), large.unwrapped_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
        changed += int(not torch.equal(a, before[n]))
    assert changed > 0
    # the logged loss of the step is the mean over all its target tokens either way
    assert scalars(small)[-1]["loss"] == pytest.approx(scalars(large)[-1]["loss"], rel=1e-6)
    assert scalars(small)[-1]["tokens"] == scalars(large)[-1]["tokens"]


def test_lr_of_every_iteration_follows_the_closed_form(tmp_path, tiny_model_dir, oasst1_dir):
    runner = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "lr", max_epochs=3, warmup_ratio=0.2,
                          lr=1e-3, accumulative_counts=1, save_steps=1000, max_length=64)
    n = len(runner.train_dataloader)
    runner.train()
    logged = [s["lr"] for s in scalars(runner)]
    assert len(logged) == 3 * n
    warm_end = int(0.2 * 3 * n)
    for i, lr in enumerate(logged):
        if i < warm_end:
            factor = 1e-5 + (1 - 1e-5) * min(i, warm_end - 1) / max(warm_end - 1, 1)
            expected = 1e-3 * factor
        else:
            expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * (i - warm_end) / (3 * n - warm_end)))
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), i


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, oasst1_dir):
    kwargs = dict(max_epochs=2, accumulative_counts=2, save_steps=2, max_length=64, lr=1e-3,
                  nested={"default_hooks.checkpoint.max_keep_ckpts": -1,
                          # LoRA with dropout: resuming must restore the RNG for the dropout masks to match
                          "model.lora": dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.1,
                                             task_type="CAUSAL_LM")})
    whole = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "whole", **kwargs)
    assert whole.max_iters >= 6
    whole.train()
    trace = [(s["iter"], s["loss"], s["lr"]) for s in scalars(whole)]

    # a run that stopped after its checkpoint at iteration 4 (mid-epoch) continues from it
    cut = 4
    resumed = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "whole", resume=str(whole.work_dir / f"iter_{cut}"),
                           **kwargs)
    assert resumed.iter == cut and resumed.run_id == whole.run_id
    resumed.train()
    tail = [(s["iter"], s["loss"], s["lr"]) for s in scalars(resumed)]
    assert [t[0] for t in tail] == [t[0] for t in trace[cut:]]
    for (i, loss_a, lr_a), (_, loss_b, lr_b) in zip(trace[cut:], tail):
        assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6), i
        assert lr_a == pytest.approx(lr_b, rel=1e-12)
    for (n, a), (_, b) in zip(whole.unwrapped_model.named_parameters(), resumed.unwrapped_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_resume_flag_takes_the_newest_checkpoint_and_load_from_only_weights(tmp_path, tiny_model_dir, oasst1_dir):
    kwargs = dict(max_epochs=1, save_steps=2, max_length=64, accumulative_counts=1,
                  nested={"model.llm.quantization_config": None})
    first = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "w", **kwargs)
    first.train()
    latest = ckpt.find_latest(first.work_dir)
    assert latest.name == f"iter_{first.max_iters}"

    again = Runner.from_config(first.cfg, work_dir=str(first.work_dir), seed=3, resume=True)
    assert again.iter == first.max_iters

    fresh = Runner.from_config(first.cfg, work_dir=str(tmp_path / "other"), seed=3, load_from=str(latest))
    assert fresh.iter == 0
    for (n, a), (_, b) in zip(first.unwrapped_model.named_parameters(), fresh.unwrapped_model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=n)


def test_retention_keeps_the_newest(tmp_path, tiny_model_dir, oasst1_dir):
    runner = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "keep", max_epochs=2, save_steps=1,
                          accumulative_counts=1, max_length=64, save_total_limit=2)
    runner.train()
    kept = [p.name for p in ckpt.list_checkpoints(runner.work_dir)]
    assert kept == [f"iter_{runner.max_iters - 1}", f"iter_{runner.max_iters}"]


def test_crash_during_save_leaves_previous_checkpoints_intact(tmp_path, tiny_model_dir, oasst1_dir, monkeypatch):
    runner = _full_runner(tmp_path, tiny_model_dir, oasst1_dir, "crash", max_epochs=2, save_steps=2,
                          accumulative_counts=1, max_length=64, save_total_limit=-1)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint's trainer state
            real_save(obj, f, *args, **kwargs)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError):
        runner.train()
    work = runner.work_dir
    assert [p.name for p in ckpt.list_checkpoints(work)] == ["iter_2", "iter_4"]
    assert ckpt.read_pointer(work) == ("iter_4", runner.run_id)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]
    assert not (work / "iter_6").exists()


def test_a_run_stopped_by_max_iters_mid_epoch_continues_that_epoch(tmp_path, tiny_model_dir, oasst1_dir):
    # constant lr (no schedule), so a longer run and a stopped-then-extended run see the same lr
    common = {"param_scheduler": None, "accumulative_counts": 1, "save_steps": 100, "evaluation_freq": 100,
              "default_hooks.logger.interval": 1, "train_cfg.max_epochs": None,
              "model.llm.quantization_config": None, "model.llm.torch_dtype": torch.float32,
              "model.lora.lora_dropout": 0.0, "optim_wrapper.dtype": "float32"}
    full = make_runner(tmp_path / "full", tiny_model_dir, oasst1_dir, nested={**common, "train_cfg.max_iters": 6})
    assert full.train_loop.iters_per_epoch > 6  # the stop at 3 falls inside the first epoch
    full.train()
    first = make_runner(tmp_path / "part", tiny_model_dir, oasst1_dir, nested={**common, "train_cfg.max_iters": 3})
    first.train()
    assert first.train_loop.epoch == 0 and first.train_loop.iter_in_epoch == 3
    cfg = Config.fromfile(SEED_CFG, {**seed_overrides(tiny_model_dir, oasst1_dir), **common,
                                     "train_cfg.max_iters": 6})
    resumed = Runner.from_config(cfg, work_dir=str(first.work_dir), seed=1, resume=True)
    assert resumed.iter == 3
    resumed.train()
    assert resumed.iter == 6
    expected = {r["iter"]: r["loss"] for r in scalars(full)}
    got = {r["iter"]: r["loss"] for r in scalars(resumed)}
    assert sorted(got) == [4, 5, 6]
    for it, loss in got.items():
        assert abs(loss - expected[it]) < 1e-6, (it, loss, expected[it])


# ------------------------------------------------------------------ failed runs

def test_a_run_that_fails_before_training_leaves_nothing_in_the_work_dir(tmp_path, tiny_model_dir, oasst1_dir):
    cfg = Config.fromfile(SEED_CFG, {**seed_overrides(tiny_model_dir, str(tmp_path / "no_such_data")),
                                     "custom_hooks.1.max_new_tokens": 2})
    work = tmp_path / "fresh"
    with pytest.raises(Exception, match="no_such_data"):
        Runner.from_config(cfg, work_dir=str(work), seed=1)
    assert not work.exists()  # made by the failed run, so removed with it

    used = tmp_path / "used"
    (used / "notes.txt").parent.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="no_such_data"):
        Runner.from_config(cfg, work_dir=str(used), seed=1)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


def test_a_run_that_fails_while_training_keeps_its_log_with_the_error(tmp_path, tiny_model_dir, oasst1_dir,
                                                                      monkeypatch):
    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, nested={"model.llm.quantization_config": None},
                         save_steps=100, evaluation_freq=100, accumulative_counts=1)
    real_step = runner.train_loop.run_step
    calls = {"n": 0}

    def failing(group):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the machine broke")
        return real_step(group)

    monkeypatch.setattr(runner.train_loop, "run_step", failing)
    with pytest.raises(RuntimeError):
        runner.train()
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "the run stopped at iteration 2: RuntimeError: the machine broke" in log.splitlines()[-1]
    assert (runner.log_dir / "first_row.txt").is_file()  # the rest of the run's records stay with it


def test_evaluation_logs_each_answer_as_it_comes_and_how_far_a_long_one_got(tmp_path, tiny_model_dir,
                                                                           oasst1_dir, monkeypatch):
    from lmtune.engine.hooks import EvaluateChatHook

    runner = make_runner(tmp_path, tiny_model_dir, oasst1_dir, nested={"model.llm.quantization_config": None},
                         evaluation_inputs=["one", "two"])
    chat = next(h for h in runner.hooks if isinstance(h, EvaluateChatHook))
    monkeypatch.setattr(EvaluateChatHook, "HEARTBEAT_S", 0.0)  # every token is "long"
    chat._evaluate(runner, "now")
    lines = (runner.log_dir / f"{runner.timestamp}.log").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Evaluate chat (now): 2 prompts, up to 6 new tokens each" in line)
    told = [line for line in lines[start:] if "... answer" in line]
    assert told and all("of at most 6 tokens so far" in line for line in told)
    assert any("answer 1/2: 1 of at most" in line for line in told)
    assert sum("  Q: one" in line for line in lines) == 1 and sum("  Q: two" in line for line in lines) == 1
    records = [r for r in read_jsonl(runner.log_dir / "eval_chat.jsonl") if r["when"] == "now"]
    assert [r["input"] for r in records] == ["one", "two"] and all(1 <= r["new_tokens"] <= 6 for r in records)
