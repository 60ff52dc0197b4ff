"""Export and merge: checkpoints become PEFT adapters or full HF models with the trained logits."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OASST1_ROWS, write_jsonl
from safetensors.torch import load_file

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.checkpoint import export as convert
from lmtune.engine.runner import Runner
from lmtune.tools import convert as convert_cli

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def _train(root: Path, model_dir: str, full: bool, qlora: bool = False) -> tuple[Runner, Path]:
    data = root / "oasst1"
    write_jsonl(data / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4)
    nested = {"model.llm.quantization_config": None, "custom_hooks.1.max_new_tokens": 4}
    if full:
        nested["model.lora"] = None
    if qlora:  # 4-bit base computing in fp32, so that reloading it gives the same logits
        nested = {"custom_hooks.1.max_new_tokens": 4, "model.llm.torch_dtype": torch.float32,
                  "model.llm.quantization_config.bnb_4bit_compute_dtype": torch.float32}
    cfg = Config.fromfile(SEED_CFG, dict(pretrained_model_name_or_path=model_dir, data_path=str(data),
                                         max_length=96, max_epochs=1, accumulative_counts=1, lr=1e-2,
                                         save_steps=1000, evaluation_freq=1000, evaluation_inputs=["Hi."],
                                         **nested))
    runner = Runner.from_config(cfg, work_dir=str(root / "work"), seed=1)
    runner.train()
    latest = ckpt.find_latest(runner.work_dir)
    assert latest is not None
    return runner, latest


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    return _train(tmp_path_factory.mktemp("lora"), tiny_model_dir, full=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    return _train(tmp_path_factory.mktemp("full"), tiny_model_dir, full=True)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir):
    return _train(tmp_path_factory.mktemp("qlora"), tiny_model_dir, full=False, qlora=True)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtune")
    convert_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def test_lora_checkpoint_exports_as_peft_adapter(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runner, latest = lora_run
    out = tmp_path / "adapter"
    assert _cli("convert", "pth_to_hf", str(latest / "config.py"), str(latest), str(out)) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / convert.CONFIG_COPY).is_file()
    info = json.loads((out / convert.EXPORT_INFO).read_text())
    assert info["prompt_template"] == "internlm2_chat" and info["base_model"] == tiny_model_dir

    trained = runner.unwrapped_model.llm
    # the run loaded the base in its training dtype (float16 in the config, bfloat16 on the CPU)
    dtype = trained.get_base_model().get_input_embeddings().weight.dtype
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    loaded = PeftModel.from_pretrained(base, str(out)).float()
    trained = trained.float()
    torch.testing.assert_close(_logits(loaded), _logits(trained), atol=1e-5, rtol=1e-5)


def test_full_checkpoint_exports_as_hf_model(full_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner, latest = full_run
    out = tmp_path / "full"
    convert.pth_to_hf(None, latest, out, fp32=True)
    assert (out / "config.json").is_file() and (out / convert.CONFIG_COPY).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(model), _logits(runner.unwrapped_model.llm), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_model_dir))

    # without --fp32 the config's dtype (float16) is kept; shards respect --max-shard-size
    half = tmp_path / "half"
    assert _cli("convert", "pth_to_hf", str(latest / "config.py"), str(latest), str(half),
                "--max-shard-size", "100KB") == 0
    shards = sorted(half.glob("model*.safetensors"))
    assert len(shards) > 1 and (half / "model.safetensors.index.json").is_file()
    assert {t.dtype for f in shards for t in load_file(str(f)).values()} == {torch.float16}


def test_full_export_never_reads_the_base_weights(full_run, tiny_model_dir, tmp_path):
    # a full checkpoint holds every weight: export builds the model empty and assigns them, so a base
    # directory with only its config (weights gone) exports the same model
    runner, latest = full_run
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    options = {"pretrained_model_name_or_path": str(base)}
    out = convert.pth_to_hf(latest / "config.py", latest, tmp_path / "out", fp32=True, cfg_options=options)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(_logits(model), _logits(runner.unwrapped_model.llm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_merge_equals_base_plus_adapter(lora_run, tiny_model_dir, tmp_path, device):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, latest = lora_run
    adapter = convert.pth_to_hf(None, latest, tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    assert _cli("convert", "merge", tiny_model_dir, str(adapter), str(merged_dir), "--device", device) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert not any("lora_" in k for f in merged_dir.glob("*.safetensors") for k in load_file(str(f)))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                                              dtype=torch.float32), str(adapter))
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-4, rtol=1e-4)
    AutoTokenizer.from_pretrained(str(merged_dir))
    # the merged model chats with the training template and system prompt, as the adapter does
    from lmtune.tools.chat import recorded_export

    record = json.loads((adapter / convert.EXPORT_INFO).read_text())
    merged_record = recorded_export(None, str(merged_dir))
    assert merged_record["prompt_template"] == record["prompt_template"] == "internlm2_chat"
    assert merged_record["lora"] is False and merged_record["merged_adapter"] == str(adapter.resolve())
    assert (merged_dir / convert.CONFIG_COPY).read_text() == (adapter / convert.CONFIG_COPY).read_text()


def test_merge_into_4bit_base_is_refused(lora_run, tiny_model_dir, tmp_path):
    _, latest = lora_run
    adapter = convert.pth_to_hf(None, latest, tmp_path / "adapter")
    fake = tmp_path / "base4bit"
    shutil.copytree(tiny_model_dir, fake)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="dequantized"):
        convert.merge(fake, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_or_incomplete_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        convert.pth_to_hf(str(SEED_CFG), tmp_path / "iter_9", tmp_path / "out")
    broken = tmp_path / "iter_3"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="incomplete"):
        convert.pth_to_hf(str(SEED_CFG), broken, tmp_path / "out")
    with pytest.raises(ConfigError, match="adapter_config.json"):
        convert.merge(tmp_path, tmp_path, tmp_path / "out")


def test_hf_checkpoint_hook_exports_at_the_end_of_training(tmp_path, tiny_model_dir, oasst1_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.config import Config
    from lmtune.engine.hooks import HFCheckpointHook
    from lmtune.engine.runner import Runner

    cfg = Config.fromfile(SEED_CFG, {"pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir,
                                     "max_length": 64, "max_epochs": 1, "accumulative_counts": 1,
                                     "model.llm.quantization_config": None, "custom_hooks": [
                                         dict(type=HFCheckpointHook, out_dir=str(tmp_path / "hf"))]})
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=0)
    runner.train()
    trained = runner.unwrapped_model.llm.eval()
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        # the spec config loads the base in float16, which becomes bfloat16 on a CPU
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=trained.get_base_model().dtype)
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "hf")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits.float(), expected.float(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "hf" / "lmtune_export.json").is_file()


def test_empty_build_reties_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtune.model.sft import SupervisedFinetune
    from lmtune.tools.tiny_model import make_tiny_llama

    path = str(make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True))
    llm_cfg = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path)
    trained = SupervisedFinetune(llm=llm_cfg, use_activation_checkpointing=False)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.01 * torch.randn_like(param))
    empty = convert._empty_llm(llm_cfg)
    assert empty is not None and all(p.is_meta for p in empty.parameters())
    rebuilt = SupervisedFinetune(llm=empty, use_activation_checkpointing=False)
    rebuilt.load_trainable_state_dict(trained.trainable_state_dict(), assign=True)
    head = rebuilt.llm.get_output_embeddings().weight
    assert head.data_ptr() == rebuilt.llm.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(_logits(rebuilt.llm), _logits(trained.llm))


def test_qlora_checkpoint_exports_an_adapter_that_loads_on_the_4bit_base(qlora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lmtune.model.build import keep_4bit_weights_trainable
    from lmtune.tools.chat import load_for_chat

    runner, latest = qlora_run
    out = tmp_path / "adapter"
    assert _cli("convert", "pth_to_hf", str(latest / "config.py"), str(latest), str(out)) == 0
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)
    loaded = PeftModel.from_pretrained(base, str(out))
    # compare on the same CPU 4-bit kernel: inference would otherwise repack the weights for a faster kernel
    # whose rounding differs by ~1e-3
    keep_4bit_weights_trainable(loaded)
    expected = _logits(runner.unwrapped_model.llm)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    # `lmtune chat BASE --adapter OUT --bits 4` loads the same model
    chat_model, _ = load_for_chat(tiny_model_dir, str(out), bits=4, torch_dtype="fp32")
    keep_4bit_weights_trainable(chat_model)
    torch.testing.assert_close(_logits(chat_model), expected, atol=1e-5, rtol=1e-5)


def _base_with_own_code(tiny_model_dir: str, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny base whose config.json names its own code (auto_map), which leaves a mark when it runs."""
    base, mark = root / "base_with_code", root / "the_code_ran"
    shutil.copytree(tiny_model_dir, base)
    (base / "configuration_mine.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).touch()\nfrom transformers import LlamaConfig\n\n\n"
        "class MineConfig(LlamaConfig):\n    model_type = 'mine_llama'\n")
    (base / "modeling_mine.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mine import MineConfig\n\n\n"
        "class MineForCausalLM(LlamaForCausalLM):\n    config_class = MineConfig\n")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="mine_llama", auto_map={"AutoConfig": "configuration_mine.MineConfig",
                                                     "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    return base, mark


def test_merge_runs_a_base_models_own_code_only_when_asked(lora_run, tiny_model_dir, tmp_path):
    _, latest = lora_run
    adapter = convert.pth_to_hf(None, latest, tmp_path / "adapter")
    record = json.loads((adapter / convert.EXPORT_INFO).read_text())
    assert record["trust_remote_code"] is True  # the seed's config (XTuner's) asks for it
    record.pop("trust_remote_code")
    (adapter / convert.EXPORT_INFO).write_text(json.dumps(record))
    base, mark = _base_with_own_code(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        _cli("convert", "merge", str(base), str(adapter), str(tmp_path / "merged"))
    assert not mark.exists()  # nothing of the repository ran
    assert _cli("convert", "merge", str(base), str(adapter), str(tmp_path / "merged"), "--trust-remote-code") == 0
    assert mark.exists() and (tmp_path / "merged" / "config.json").is_file()
