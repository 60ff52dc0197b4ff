"""lmtune check: parameter counts from the meta device, the rendered sample, memory and step estimates, problems."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import OASST1_ROWS, write_jsonl

import lmtune
from lmtune.config import Config, ConfigError, build
from lmtune.dataset.huggingface import process_hf_dataset
from lmtune.dataset.templates import PROMPT_TEMPLATE
from lmtune.tools import check
from lmtune.tools.check import check_config, run_check

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
NO_QUANT = {"model.llm.quantization_config": None}
FULL = {"model.lora": None, "model.llm.quantization_config": None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("check_data")
    write_jsonl(root / "oasst1" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4)
    return str(root / "oasst1")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A model dir with a config (hidden 512) and the tiny tokenizer, and no weights at all: the check must not
    need them. Wide enough that its linear layers, not its embeddings, hold most parameters."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("wide_model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model_dir) / name, root / name)
    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, max_position_embeddings=1024, dtype="bfloat16", bos_token_id=None,
                eos_token_id=0, pad_token_id=1).save_pretrained(root)
    assert not list(root.glob("*.safetensors"))
    return str(root)


def _cfg(model_dir: str, data_dir: str, **overrides) -> Config:
    return Config.fromfile(SEED_CFG, {"pretrained_model_name_or_path": model_dir, "data_path": data_dir,
                                      "max_length": 64, **overrides})


def _check(cfg: Config, **kwargs) -> tuple[check.CheckReport, str]:
    out = io.StringIO()
    report = check_config(cfg, out, **kwargs)
    return report, out.getvalue()


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lmtune")
    check.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _opts(model_dir: str, data_dir: str, *extra: str) -> list[str]:
    return ["--cfg-options", f"pretrained_model_name_or_path={model_dir}", f"data_path={data_dir}", "max_length=64",
            *extra]


def _counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


# ------------------------------------------------------------------ report, counts, sample

def test_check_reference_config_reports_sample_counts_and_exits_0(capsys, tiny_model_dir, data_dir):
    assert _cli("check", str(SEED_CFG), *_opts(tiny_model_dir, data_dir)) == 0
    out = capsys.readouterr().out
    # the first sample, and its trained part marked as DatasetInfoHook does
    assert "[sample 0, input]\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" \
           "The capital of France is Paris.<|im_end|>\n" in out
    masked = out.split("[sample 0, trained part")[1].splitlines()[1]
    assert masked.startswith("[masked: ") and masked.endswith(" tokens]The capital of France is Paris.<|im_end|>")
    for section in ("== tokenizer", "== data", "== model", "== memory per device", "== schedule"):
        assert section in out
    assert "prompt template: internlm2_chat; stop words: '<|im_end|>'" in out
    assert "quantized: " in out and "in 4 bits (double quantization)" in out
    assert "OK: no problems found" in out


def test_parameter_counts_equal_those_of_the_really_built_model(tiny_model_dir, data_dir):
    # LoRA on the unquantized model: every count exact
    lora, _ = _check(_cfg(tiny_model_dir, data_dir, **NO_QUANT), rows=4)
    total, trainable = _counts(build(_cfg(tiny_model_dir, data_dir, **NO_QUANT).model, key="model"))
    assert (lora.model.total_params, lora.model.trainable_params) == (total, trainable)
    assert 0 < trainable < total

    # full fine-tuning: everything trains
    full, _ = _check(_cfg(tiny_model_dir, data_dir, **FULL), rows=4)
    total_full, trainable_full = _counts(build(_cfg(tiny_model_dir, data_dir, **FULL).model, key="model"))
    assert full.model.total_params == full.model.trainable_params == total_full == trainable_full

    # QLoRA: the same adapters; bitsandbytes stores two 4-bit weights per element, the check counts weights
    qlora, out = _check(_cfg(tiny_model_dir, data_dir), rows=4)
    total_q, trainable_q = _counts(build(_cfg(tiny_model_dir, data_dir).model, key="model"))
    assert qlora.model.trainable_params == trainable_q == trainable
    assert qlora.model.total_params == total
    assert qlora.model.quantized_params > 0
    assert total_q == total - qlora.model.quantized_params // 2
    assert f"parameters: {total:,} total, {trainable:,} trainable" in out


def test_the_check_reads_no_weights_and_counts_a_7b_sized_config_exactly(tmp_path, tiny_model_dir, data_dir):
    """Llama-2-7B's published parameter count, from a directory that holds only its config and a tokenizer."""
    from transformers import LlamaConfig

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model_dir) / name, tmp_path / name)
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096, dtype="float16").save_pretrained(tmp_path)
    report, _ = _check(_cfg(str(tmp_path), data_dir, **FULL), rows=4)
    assert report.model.total_params == report.model.trainable_params == 6_738_415_616
    # full fine-tuning without sharding: fp32 weights and gradients, two fp32 AdamW states
    assert report.memory.weights == report.memory.gradients == 4 * 6_738_415_616
    assert report.memory.optimizer == 8 * 6_738_415_616


# ------------------------------------------------------------------ memory

def test_memory_moves_the_right_way(wide_model_dir, data_dir):
    def memory(nproc=1, deepspeed=None, **overrides):
        overrides.setdefault("max_length", 256)
        report, _ = _check(_cfg(wide_model_dir, data_dir, **overrides), rows=4, nproc=nproc, deepspeed=deepspeed)
        return report

    qlora = memory()
    lora = memory(**NO_QUANT)
    # QLoRA: 4-bit linear weights (and fp32 embeddings/norms) take less than 16-bit LoRA weights
    assert qlora.memory.weights < lora.memory.weights
    assert qlora.memory.gradients == lora.memory.gradients and qlora.memory.optimizer == lora.memory.optimizer
    # LoRA: frozen weights as loaded (fp16 here), adapters in fp32
    m = lora.model
    assert lora.memory.weights == 2 * (m.total_params - m.trainable_params) + 4 * m.trainable_params
    assert lora.memory.optimizer == 8 * m.trainable_params

    # activation checkpointing keeps less, and switching it off raises the total
    assert qlora.memory.activations_checkpointed < qlora.memory.activations
    no_ckpt = memory(**{"model.use_activation_checkpointing": False})
    assert not no_ckpt.memory.checkpointing and no_ckpt.memory.total() > qlora.memory.total()
    # longer rows, more activations
    assert memory(max_length=512).memory.activations > qlora.memory.activations

    # full fine-tuning under ZeRO over 8 devices: each stage shards more
    ddp = memory(nproc=8, **FULL).memory
    zero1 = memory(nproc=8, deepspeed="deepspeed_zero1", **FULL).memory
    zero2 = memory(nproc=8, deepspeed="deepspeed_zero2", **FULL).memory
    zero3 = memory(nproc=8, deepspeed="deepspeed_zero3", **FULL).memory
    offload = memory(nproc=8, deepspeed="deepspeed_zero3_offload", **FULL).memory
    assert zero1.optimizer < ddp.optimizer and zero1.gradients == zero2.gradients * 8
    assert zero2.gradients < zero1.gradients
    assert zero3.weights < zero2.weights / 2  # ZeRO-3 on 8 devices: an eighth, plus one gathered layer
    assert zero3.total() < zero2.total() < zero1.total() < ddp.total()
    assert offload.optimizer == 0 and offload.cpu > 0 and offload.weights < zero3.weights
    assert memory(nproc=1, deepspeed="deepspeed_zero3", **FULL).memory.weights > zero3.weights


def test_sequence_parallelism_splits_the_activations_and_the_data_ranks(wide_model_dir, data_dir):
    """sequence_parallel_size=2: each device holds half of every row's activations and logits (the weights,
    gradients and optimizer states as without it), and two devices make one data-parallel group."""
    cfg = lambda **o: _cfg(wide_model_dir, data_dir, max_length=256, **NO_QUANT, **o)  # noqa: E731
    plain, _ = _check(cfg(), rows=4, nproc=2)
    split, text = _check(cfg(sequence_parallel_size=2), rows=4, nproc=2)
    a, b = plain.memory, split.memory
    assert (b.weights, b.gradients, b.optimizer) == (a.weights, a.gradients, a.optimizer)
    for part in ("activations", "activations_checkpointed", "logits"):
        assert getattr(b, part) == pytest.approx(getattr(a, part) / 2, rel=0.01), part
    assert "each row split over 2 devices, 1 data-parallel group(s)" in text
    assert "each row split over 2 devices: 128 tokens per device" in text
    assert "x 1 data-parallel group(s) of 2 devices = " in text
    assert split.iters_per_epoch == _check(cfg(), rows=4)[0].iters_per_epoch  # one group reads what one rank does
    # one device asked for: checked on the two the split needs, and said so
    alone, _ = _check(cfg(sequence_parallel_size=2), rows=4)
    assert alone.engine.nproc == 2 and any("checked on 2 devices" in n for n in alone.notes)
    with pytest.raises(ConfigError, match="--nproc 3 is not one"):
        _check(cfg(sequence_parallel_size=2), rows=4, nproc=3)


def test_gpu_memory_limit_is_a_problem_when_exceeded(wide_model_dir, data_dir):
    cfg = _cfg(wide_model_dir, data_dir, **FULL)
    assert run_check(cfg, io.StringIO(), gpu_memory_gib=80) == []
    problems = run_check(_cfg(wide_model_dir, data_dir, **FULL), io.StringIO(), gpu_memory_gib=0.01)
    assert len(problems) == 1 and "--gpu-memory" in problems[0]


# ------------------------------------------------------------------ steps

def test_optimizer_steps_exact_for_the_whole_dataset_and_estimated_from_a_sample(tiny_model_dir, data_dir):
    cfg = _cfg(tiny_model_dir, data_dir, accumulative_counts=2, max_epochs=3)
    whole, out = _check(cfg, rows=1000)
    dataset = process_hf_dataset(**{k: v for k, v in dict(cfg.train_dataset).items() if k != "type"},
                                 use_cache=False)
    assert whole.rows_exact and whole.rows == len(dataset)
    assert whole.iters_per_epoch == len(dataset)  # batch size 1, one device
    assert whole.optimizer_steps == 3 * math.ceil(len(dataset) / 2)
    assert f"training rows: {len(dataset):,}\n" in out

    sampled, out = _check(_cfg(tiny_model_dir, data_dir, accumulative_counts=2, max_epochs=3), rows=6, nproc=2)
    assert not sampled.rows_exact and "estimated from the sampled rows" in out
    assert 0.5 * len(dataset) <= sampled.rows <= 1.5 * len(dataset)
    assert sampled.iters_per_epoch == math.ceil(sampled.rows / 2)  # two devices
    assert sampled.optimizer_steps == 3 * math.ceil(sampled.iters_per_epoch / 2)


def test_the_check_plans_the_steps_of_the_training_loop(tmp_path, tiny_model_dir, data_dir):
    """The check counts optimizer steps with the loop's own grouping: groups of accumulative_counts counted
    from each epoch's start, the last one of an epoch shorter, a max_iters stop inside an epoch."""
    from lmtune.engine.runner import Runner

    for n, train_overrides in enumerate([{"max_epochs": 2}, {"train_cfg.max_epochs": None, "train_cfg.max_iters": 17}]):
        cfg = _cfg(tiny_model_dir, data_dir, accumulative_counts=5, batch_size=2, pack_to_max_length=False,
                   custom_hooks=[], save_steps=1000, **train_overrides)
        report, _ = _check(cfg, rows=1000)
        runner = Runner.from_config(cfg, work_dir=str(tmp_path / str(n)))
        assert runner.train_loop.iters_per_epoch == report.iters_per_epoch
        assert report.iters_per_epoch % 5 != 0  # so that an epoch ends with a short step
        steps = []
        runner.optim_wrapper.optimizer.register_step_post_hook(lambda *_, seen=steps: seen.append(1))
        runner.train()
        assert len(steps) == report.optimizer_steps


# ------------------------------------------------------------------ problems

def test_max_length_above_the_model_positions_is_a_problem(capsys, tiny_model_dir, data_dir):
    # the tiny model has 2048 positions
    assert _cli("check", str(SEED_CFG), *_opts(tiny_model_dir, data_dir, "max_length=4096")) == 1
    out = capsys.readouterr().out
    assert "max_length=4096 is above the model's max_position_embeddings=2048" in out
    assert "1 problem(s)" in out


def test_a_stop_word_the_tokenizer_does_not_know_is_a_problem(tiny_model_dir, data_dir):
    cfg = _cfg(tiny_model_dir, data_dir, prompt_template=PROMPT_TEMPLATE.llama3_chat)
    problems = run_check(cfg, io.StringIO(), rows=4)
    assert any("stop word '<|eot_id|>' is not a single token" in p for p in problems), problems


def test_varlen_attention_with_a_batch_of_two_is_a_problem(tiny_model_dir, data_dir):
    problems = run_check(_cfg(tiny_model_dir, data_dir, use_varlen_attn=True, batch_size=2), io.StringIO(), rows=4)
    assert any("use_varlen_attn=True needs train_dataloader.batch_size=1" in p for p in problems), problems
    assert run_check(_cfg(tiny_model_dir, data_dir, use_varlen_attn=True), io.StringIO(), rows=4) == []


def test_a_tokenizer_larger_than_the_embedding_table_is_a_problem(tmp_path, tiny_model_dir, data_dir):
    model_dir = tmp_path / "small_vocab"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = 300
    (model_dir / "config.json").write_text(json.dumps(config))
    small, _ = _check(_cfg(str(model_dir), data_dir), rows=4)
    assert any("embedding table only 300" in p for p in small.problems), small.problems
    # with the tokenizer passed to the model, SupervisedFinetune resizes the embeddings (and the output head)
    cfg = _cfg(str(model_dir), data_dir)
    cfg.model["tokenizer"] = cfg.tokenizer
    resized, _ = _check(cfg, rows=4)
    tokens = len(build(cfg.tokenizer, key="tokenizer"))
    assert resized.problems == [] and resized.model.vocab == tokens
    assert resized.model.total_params - small.model.total_params == 2 * (tokens - 300) * config["hidden_size"]


def test_unknown_config_name_and_bad_engine_are_config_errors(tiny_model_dir, data_dir):
    with pytest.raises(ConfigError, match="did you mean"):
        _cli("check", "internlm2_chat_7b_qlora_oasst1_e4")
    with pytest.raises(ConfigError, match="no built-in DeepSpeed config"):
        run_check(_cfg(tiny_model_dir, data_dir), io.StringIO(), deepspeed="deepspeed_zero9")


def test_check_fetches_the_model_of_model_resource_first(tiny_model_dir, data_dir):
    """A config naming a hub id (unreachable offline) and a model_resource: the check runs on the fetched copy."""
    calls = []

    def fetch(model_id):
        calls.append(model_id)
        return tiny_model_dir

    cfg = Config.fromfile(SEED_CFG, {"data_path": data_dir, "max_length": 64})
    cfg["model_resource"] = {"fn": fetch, "args": {"model_id": cfg.pretrained_model_name_or_path}}
    report, out = _check(cfg, rows=4)
    assert calls == ["internlm/internlm2-chat-7b"] and report.problems == []
    assert f"from {tiny_model_dir}:" in out and report.model.total_params > 0


def test_the_check_reports_validation_sizes_cost_and_bad_settings(tiny_model_dir, data_dir):
    report, text = _check(_cfg(tiny_model_dir, data_dir, val_split=4, save_steps=3, pack_to_max_length=False,
                               save_best="val/loss"))
    assert report.problems == []
    assert "val_split=4 (seed 0): 4 rows held out for validation, 20 left to train on" in text
    # 24 rows unpacked at batch 1: 20 to train, 4 to validate; one pass of 4 forward-only batches
    assert report.rows == 20
    assert "validation rows: ~4; 4 batch(es) of 1 per device" in text
    assert "one pass: about the time of 1.0 training iteration(s)" in text  # 4 x 1/4 (checkpointing on)
    assert "every 3 iterations and at the end: about 33.3% more training time" in text
    assert "watched: val/loss" in text
    for settings, problem in ((dict(val_split=0.01), "holds out 0 of the 24 rows"),
                              (dict(val_split=4, val_interval=0), "val_interval must be a positive integer"),
                              (dict(save_best="val/loss"), "'val/loss' is watched (save_best / early_stopping) but")):
        problems = run_check(_cfg(tiny_model_dir, data_dir, **settings), io.StringIO(), rows=4)
        assert any(problem in p for p in problems), (settings, problems)
