"""Baichuan / Baichuan2 through lmtune.model.ports.baichuan: what the generic tests (test_ports.py) do not cover.

The generic tests compare logits, loss, gradients and LoRA gradients of the three Baichuan fixtures
(Baichuan-7B, Baichuan2-7B with its normalised head, Baichuan2-13B with ALiBi) with the original code.
Here: the tokenizer, lmtune's own loss path (the chunked loss through the normalised head, packed
ALiBi rows), resizing, and the library's Baichuan2 configs.
"""

from __future__ import annotations

import json

import pytest
import torch
from hub_models import BAICHUAN_RESERVED, FIXTURES, baichuan_dir, sentencepiece_ids, train_library_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config.build import build
from lmtune.model import ports
from lmtune.model.ports.baichuan import NormHead, alibi_slopes
from lmtune.model.sft import SupervisedFinetune

TEXTS = ["What is the capital of France?", "<reserved_106>Say hello.<reserved_107>Hello!</s>",
         "请给我介绍五个上海的景点 42 and 3.14", "  two  spaces,\ttab\n\nnewlines", "a</s>b<s> c<unk>",
         "<reserved_102>x<reserved_103>", "emoji 🙂 and ẞ unseen characters", ""]


def _load(path, **kwargs):
    return ports.from_pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("fixture,bos", [("baichuan2_7b", False), ("baichuan_7b", True)])
@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_baichuan_tokenizer_equals_sentencepiece(tmp_path, fixture, bos, trust_remote_code):
    hub = baichuan_dir(tmp_path, fixture)
    tokenizer = build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub),
                           trust_remote_code=trust_remote_code))
    for text in TEXTS:
        expected = sentencepiece_ids(hub / "tokenizer.model", text, [], bos=bos)
        assert tokenizer(text)["input_ids"] == expected, text
    for marker in BAICHUAN_RESERVED:  # a piece of its own, as in Baichuan's vocabulary
        assert tokenizer.convert_tokens_to_ids(marker) in tokenizer(f"a{marker}b")["input_ids"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_slopes_are_baichuans():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    # 6 heads: those of 4, then every other one of 8
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("fixture", ["baichuan2_7b", "baichuan2_13b"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_lmtunes_loss_through_the_normalised_head_is_the_originals(fixture, chunk):
    reference = load_file(str(FIXTURES / fixture / "reference.safetensors"))
    model = _load(FIXTURES / fixture)
    assert isinstance(model.lm_head, NormHead)
    sft = SupervisedFinetune(model, use_activation_checkpointing=False, loss_chunk_size=chunk)
    sft.train()
    rows = reference["input_ids"]
    out = sft(input_ids=rows, labels=rows)
    torch.testing.assert_close(out["loss"].reshape(1), reference["loss"], atol=1e-5, rtol=1e-5)
    assert sft._chunked_loss_ok is (True if chunk else None)  # the chunked path ran (not the plain one)
    out["loss"].backward()
    torch.testing.assert_close(model.lm_head.weight.grad, reference["grad.lm_head.weight"], atol=1e-5, rtol=1e-5)


def test_packed_alibi_rows_equal_their_samples_with_lmtunes_loss():
    model = _load(FIXTURES / "baichuan2_13b")
    sft = SupervisedFinetune(model, use_activation_checkpointing=False)
    a, b = torch.tensor([[5, 17, 42, 99, 7]]), torch.tensor([[300, 12, 77, 190, 45, 6, 2]])
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    labels = packed.clone()
    labels[0, 5] = -100  # the first token of the second sample is no target of the first
    whole = sft(input_ids=packed, labels=labels, position_ids=positions)
    alone = [sft(input_ids=x, labels=x) for x in (a, b)]
    torch.testing.assert_close(whole["loss_sum"], alone[0]["loss_sum"] + alone[1]["loss_sum"], atol=1e-4, rtol=1e-5)


def test_a_resized_baichuan2_keeps_its_normalised_head_and_says_so_on_export(tmp_path):
    model = _load(FIXTURES / "baichuan2_7b")
    model.resize_token_embeddings(520)
    assert isinstance(model.lm_head, NormHead)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vocab_size"] == 520 and saved["norm_head"] is True
    again = _load(tmp_path / "out")
    assert isinstance(again.lm_head, NormHead)


LIBRARY_RUNS = [("baichuan2_7b_chat_qlora_alpaca_e3", "baichuan2_7b"), ("baichuan2_13b_chat_lora_oasst1_e3",
                                                                         "baichuan2_13b"),
                ("baichuan2_7b_chat_full_custom_e3", "baichuan2_7b")]


@pytest.mark.parametrize("name,fixture", LIBRARY_RUNS)
def test_library_baichuan2_configs_train_packed_without_remote_code(name, fixture, tmp_path):
    runner = train_library_config(name, baichuan_dir(tmp_path, fixture), tmp_path)
    assert type(runner.unwrapped_model._base_model()).__module__ == "lmtune.model.ports.baichuan"
