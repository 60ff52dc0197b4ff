"""MiniCPM and MiniCPM3 ports (lmtune.model.ports.minicpm): what tests/test_ports.py does not check for every port.

tests/test_ports.py compares the fixtures ``minicpm``, ``minicpm_untied_dynamic``, ``minicpm_longrope``,
``minicpm3`` and ``minicpm3_longrope`` with the original code (logits, loss, gradients, LoRA, round trip,
packing). Here: the tokenizers give the original tokenizers' ids, the variants the port does not cover stop
in one sentence, and the library's MiniCPM configs train packed on hub-layout directories without
trust_remote_code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hub_models import FIXTURES, STAND_IN_CODE
from hub_models_minicpm import MINICPM3_SPECIALS, MINICPM_MARKERS, minicpm3_dir, minicpm_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lmtune.config import ConfigError
from lmtune.config.build import build
from lmtune.model import ports
from lmtune.model.ports import minicpm

TEXTS = ["What is the capital of France?", "<用户>Say hello.<AI>Hello!", "请给我介绍五个上海的景点 42 and 3.14",
         "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>",
         "<|tool_call|><|execute_start|>x<|execute_end|><|fim_prefix|>a<|fim_middle|>b<|fim_suffix|>",
         "  two  spaces,\ttab\n\nnewlines", "a</s>b<s> c<unk>", "emoji 🙂 and ẞ unseen characters", ""]


def _original_ids(model_file: Path, text: str, specials: list[str], bos: bool) -> list[int]:
    """What the original tokenizers give (MiniCPM-2B's LlamaTokenizer; MiniCPM3's LlamaTokenizerFast, legacy): BOS
    where add_bos_token says so, then the text split at the special tokens, each piece encoded by sentencepiece on
    its own (with its dummy prefix), the special tokens as their ids."""
    from hub_models import sentencepiece_ids

    return sentencepiece_ids(model_file, text, specials, bos=bos)


def _tokenizer(path: Path, trust_remote_code: bool):
    return build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(path),
                      trust_remote_code=trust_remote_code, padding_side="right"))


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_minicpm_tokenizer_equals_sentencepiece_with_bos(tmp_path, trust_remote_code):
    hub_dir = minicpm_dir(tmp_path)
    tokenizer = _tokenizer(hub_dir, trust_remote_code)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _original_ids(hub_dir / "tokenizer.model", text, [], bos=True), text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    for marker in MINICPM_MARKERS:  # the chat markers are single pieces, as in MiniCPM's vocabulary
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert marker_id != tokenizer.unk_token_id and marker_id in tokenizer("x" + marker)["input_ids"]
    assert tokenizer.decode(tokenizer("Say hello.")["input_ids"], skip_special_tokens=True) == "Say hello."


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_minicpm3_tokenizer_adds_no_bos_and_keeps_its_special_tokens(tmp_path, trust_remote_code):
    hub_dir = minicpm3_dir(tmp_path)
    tokenizer = _tokenizer(hub_dir, trust_remote_code)
    for text in TEXTS:
        expected = _original_ids(hub_dir / "tokenizer.model", text, MINICPM3_SPECIALS, bos=False)
        assert tokenizer(text)["input_ids"] == expected, text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(
        "<|im_end|>")
    assert tokenizer.bos_token_id == 1
    ids = tokenizer("<|im_start|>user says hi<|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user says hi"


def test_minicpm3_tokenizer_saved_alone_is_still_recognised_and_saved_as_the_repositorys_files(tmp_path):
    hub_dir = minicpm3_dir(tmp_path)
    tokenizer = ports.from_pretrained(AutoTokenizer, str(hub_dir), trust_remote_code=True)
    out = tmp_path / "out"
    ports.save_tokenizer(tokenizer, out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenization_minicpm.py"):
        assert (out / name).read_bytes() == (hub_dir / name).read_bytes(), name
    assert not (out / "config.json").exists()  # a tokenizer on its own: its config names MiniCPMTokenizer
    again = ports.from_pretrained(AutoTokenizer, str(out), trust_remote_code=True)
    assert type(again).__module__.startswith("transformers.")
    assert again(TEXTS[3])["input_ids"] == tokenizer(TEXTS[3])["input_ids"]


# ------------------------------------------------------------------ configs and variants

def _hub(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def test_native_configs_carry_minicpms_scalings():
    config = minicpm.native_config(_hub("minicpm"))
    assert type(config).__name__ == "MiniCPMNativeConfig" and config.tie_word_embeddings  # no key: tied
    assert config.embedding_multiplier == 12 and config.logits_scaling == 1.0 and config.head_input_divisor == 4.0
    assert math.isclose(config.residual_multiplier, 1.4 / math.sqrt(2))
    assert math.isclose(config.attention_multiplier, 1 / math.sqrt(16))
    assert not minicpm.native_config(_hub("minicpm_untied_dynamic")).tie_word_embeddings
    three = minicpm.native_config(_hub("minicpm3_longrope"))
    rope = three.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["short_factor"] == rope["long_factor"]  # long at every length
    assert math.isclose(rope["attention_factor"], math.sqrt(1 + math.log(4) / math.log(16)))
    assert three.v_head_dim == 16 and three.q_lora_rank == 32
    release = minicpm.native_config(_hub("minicpm3")).rope_parameters
    assert release["attention_factor"] == 1.0 and release["short_factor"] != release["long_factor"]


@pytest.mark.parametrize("change,match", [
    ({"pretraining_tp": 2}, "pretraining_tp"), ({"num_experts": 8}, "mixture of experts"),
    ({"sparse_config": {"kernel_size": 32}}, "sparse attention"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                       "original_max_position_embeddings": 32}}, "8 entries")])
def test_uncovered_minicpm_variants_stop_in_one_sentence(change, match):
    with pytest.raises(ConfigError, match=match) as err:
        minicpm.native_config({**_hub("minicpm"), **change})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,match", [({"q_lora_rank": None}, "q_lora_rank"),
                                          ({"attention_bias": True}, "attention_bias")])
def test_uncovered_minicpm3_variants_stop_in_one_sentence(change, match):
    with pytest.raises(ConfigError, match=match):
        minicpm.native_config({**_hub("minicpm3"), **change})


def test_ports_answer_auto_config_and_lora_names_unchanged(tmp_path):
    config = ports.from_pretrained(AutoConfig, str(FIXTURES / "minicpm3"), trust_remote_code=True)
    assert type(config).__module__ == "lmtune.model.ports.minicpm"
    assert config.hub_layout["config"]["model_type"] == "minicpm3"
    assert "lmtune port of MiniCPM3" in ports.implementation(FIXTURES / "minicpm3", trust_remote_code=True)
    model = ports.from_pretrained(AutoModelForCausalLM, str(FIXTURES / "minicpm"), dtype=torch.float32)
    assert ports.native_target_modules(model, ["q_proj", "o_proj", "gate_proj"]) == ["q_proj", "o_proj", "gate_proj"]


def test_resized_minicpm_head_keeps_dividing_its_input():
    model = ports.from_pretrained(AutoModelForCausalLM, str(FIXTURES / "minicpm_untied_dynamic"), dtype=torch.float32)
    model.resize_token_embeddings(520)
    head = model.get_output_embeddings()
    assert type(head).__name__ == "ScaledInputHead" and head.input_divisor == 4.0
    hidden = torch.randn(2, 64)
    torch.testing.assert_close(head(hidden), hidden @ head.weight.T / 4.0)


# ------------------------------------------------------------------ the library's configs

LIBRARY_RUNS = [("minicpm_2b_sft_qlora_alpaca_e3", "minicpm"), ("minicpm_2b_sft_full_custom_e3", "minicpm"),
                ("minicpm3_4b_lora_oasst1_e3", "minicpm3")]


@pytest.mark.parametrize("name,fixture", LIBRARY_RUNS)
def test_library_minicpm_configs_train_packed_without_remote_code(name, fixture, tmp_path):
    from hub_models import train_library_config

    hub = minicpm_dir(tmp_path) if fixture == "minicpm" else minicpm3_dir(tmp_path)
    runner = train_library_config(name, hub, tmp_path)
    assert type(runner.unwrapped_model._base_model()).__module__ == "lmtune.model.ports.minicpm"
    for file in ("modeling_minicpm.py", "configuration_minicpm.py"):  # the hub's code was never run
        assert (hub / file).read_text() == STAND_IN_CODE
