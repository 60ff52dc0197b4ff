"""ChatGLM2 / ChatGLM3 (lmtune.model.ports.chatglm): what the generic port tests (tests/test_ports.py, over the
fixtures chatglm3, chatglm3_rope_ratio and chatglm2_mha) do not cover.

- the tokenizer gives the ids the ORIGINAL ChatGLM3 and ChatGLM2 tokenizers gave (recorded by
  tools/port_refs/chatglm.py with their code under transformers 4.48, on the SentencePiece model committed
  in tests/fixtures/ports/chatglm_tokenizer): the ``[gMASK] sop`` prefix, the tokens after the SentencePiece
  vocabulary, no special string matched in the text (ChatGLM3's ``encode_special_tokens`` matching the role
  tokens), pairs, left padding, decoding;
- the variants the port refuses, the hub's LoRA names, the stored ``inv_freq`` buffer;
- the library's ChatGLM3-6B configs train packed on a hub-layout tiny ChatGLM3 without remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_models import FIXTURES
from hub_models_chatglm import CHATGLM3_TOKENIZER_CODE, TOKENIZER_FIXTURE, chatglm_dir
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config import ConfigError
from lmtune.config.build import build
from lmtune.model import ports

REFERENCE = json.loads((TOKENIZER_FIXTURE / "reference.json").read_text(encoding="utf-8"))


def _tokenizer(hub_dir: Path, trust_remote_code: bool = True, **kwargs):
    return build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub_dir),
                      trust_remote_code=trust_remote_code, **kwargs))


# ------------------------------------------------------------------ tokenizer

FLAVOURS = [("chatglm3", False, {}), ("chatglm3_encode_special_tokens", False, {"encode_special_tokens": True}),
            ("chatglm2", True, {})]


@pytest.mark.parametrize("flavour,chatglm2,kwargs", FLAVOURS)
@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_tokenizer_gives_the_original_chatglm_tokenizers_ids(tmp_path, flavour, chatglm2, kwargs, trust_remote_code):
    ref = REFERENCE[flavour]
    tokenizer = _tokenizer(chatglm_dir(tmp_path, chatglm2=chatglm2), trust_remote_code, **kwargs)
    assert type(tokenizer).__module__.startswith("transformers.")  # no hub code
    assert len(tokenizer) == ref["vocab_size"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (ref["eos_token_id"],
                                                                                        ref["pad_token_id"], None)
    assert tokenizer.padding_side == ref["padding_side"] == "left"
    for text, ids in ref["ids"].items():
        assert tokenizer(text)["input_ids"] == ids, text
        assert ids[:2] == [tokenizer.convert_tokens_to_ids("[gMASK]"), tokenizer.convert_tokens_to_ids("sop")]
    for text, ids in ref["no_special"].items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == ref["decode"][text], text
    assert [tokenizer(a, b)["input_ids"] for a, b in [("Say hello.", "Hello!"), ("", "x")]] == ref["pairs"]
    batch = tokenizer(list(ref["ids"])[:3], padding=True)
    assert {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]} == ref["padded"]


def test_tokenizer_appends_chatglms_tokens_after_the_sentencepiece_vocabulary(tmp_path):
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(TOKENIZER_FIXTURE / "tokenizer.model")).vocab_size()
    v3 = _tokenizer(chatglm_dir(tmp_path))
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [v3.convert_tokens_to_ids(n) for n in names] == list(range(base, base + 9))
    v2 = _tokenizer(chatglm_dir(tmp_path, chatglm2=True))
    assert len(v2) == base + 5 and v2.convert_tokens_to_ids("sop") == base + 3
    text = "<|user|>\n Say hello.<|assistant|>\n"
    assert v3.convert_tokens_to_ids("<|user|>") not in v3(text)["input_ids"]  # the original matches none in text
    roles = _tokenizer(chatglm_dir(tmp_path), encode_special_tokens=True)
    assert roles(text)["input_ids"][2] == v3.convert_tokens_to_ids("<|user|>")
    assert v3.decode(v3("Hi")["input_ids"], skip_special_tokens=True) == "Hi"
    right = _tokenizer(chatglm_dir(tmp_path), padding_side="right")  # lmtune's configs pad on the right
    assert right(["a", "b c d"], padding=True)["attention_mask"][0][-1] == 0


def test_chatglm_tokenizer_saves_as_the_repositorys_own_files(tmp_path):
    hub_dir = chatglm_dir(tmp_path)
    tokenizer = _tokenizer(hub_dir)
    out = tmp_path / "out"
    ports.save_tokenizer(tokenizer, out)
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"):
        assert (out / name).read_bytes() == (hub_dir / name).read_bytes(), name
    again = _tokenizer(out, trust_remote_code=False)
    text = list(REFERENCE["chatglm3"]["ids"])[1]
    assert again(text)["input_ids"] == REFERENCE["chatglm3"]["ids"][text]


# ------------------------------------------------------------------ model

def _hub(**changes) -> dict:
    return {**json.loads((FIXTURES / "chatglm3" / "config.json").read_text()), **changes}


@pytest.mark.parametrize("changes,message", [
    ({"pre_seq_len": 16}, "P-tuning"), ({"quantization_bit": 4}, "int4/int8"), ({"rmsnorm": False}, "LayerNorm"),
    ({"add_bias_linear": True}, "biased output"), ({"post_layer_norm": False}, "final norm"),
    ({"apply_residual_connection_post_layernorm": True}, "residuals"),
    ({"_name_or_path": "THUDM/chatglm2-6b-32k", "rope_ratio": 16}, "divides the positions"),
    ({"num_layers": None, "padded_vocab_size": None}, None)])
def test_variants_the_port_does_not_cover_stop_in_one_sentence(changes, message):
    from lmtune.model.ports import chatglm

    hub = {k: v for k, v in _hub(**changes).items() if v is not None}
    with pytest.raises(ConfigError) as err:
        chatglm.native_config(hub)
    assert (message or "lacks") in str(err.value) and "\n" not in str(err.value)


def test_chatglm3_32k_rope_ratio_multiplies_the_rotary_base_and_vocab_follows_the_hub_key():
    from lmtune.model.ports import chatglm

    config = chatglm.native_config(_hub(rope_ratio=50, seq_length=32768))
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.max_position_embeddings == 32768 and config.num_key_value_heads == 2 and config.head_dim == 16
    assert config.vocab_size == 512 and config.attention_bias is True


def test_hub_lora_names_reach_the_ports_layers():
    model = ports.from_pretrained(AutoModelForCausalLM, str(FIXTURES / "chatglm3"), dtype=torch.float32)
    assert ports.native_target_modules(model, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert model.model.embed_tokens.padding_idx is None  # the hub's embedding trains its pad row too


def test_a_stored_inv_freq_buffer_is_ignored_on_load_and_not_written_back(tmp_path):
    source = chatglm_dir(tmp_path)
    weights = load_file(str(source / "model.safetensors"))
    head_dim = json.loads((source / "config.json").read_text())["kv_channels"]
    rotary = head_dim // 2
    weights["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rotary, 2) / rotary)
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    model = ports.from_pretrained(AutoModelForCausalLM, str(source), dtype=torch.float32)
    plain = ports.from_pretrained(AutoModelForCausalLM, str(FIXTURES / "chatglm3"), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=0, rtol=0)
    model.save_pretrained(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert sorted(saved) == sorted(k for k in weights if "inv_freq" not in k)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["padded_vocab_size"] == 512


# ------------------------------------------------------------------ the library's ChatGLM3 configs

# one config per method, each on another dataset (the nine share everything else)
LIBRARY_RUNS = ["chatglm3_6b_full_alpaca_e3", "chatglm3_6b_lora_custom_e3", "chatglm3_6b_qlora_oasst1_e3"]


@pytest.mark.parametrize("name", LIBRARY_RUNS)
def test_library_chatglm3_configs_train_packed_without_remote_code(name, tmp_path):
    from hub_models import train_library_config

    runner = train_library_config(name, chatglm_dir(tmp_path), tmp_path, max_length=160)
    base = runner.unwrapped_model._base_model()
    assert type(base).__name__ == "ChatGLMNativeForCausalLM" and type(base).__module__ == "lmtune.model.ports.chatglm"


def test_training_rows_and_prompts_start_with_chatglms_prefix_as_the_hub_tokenizer_and_xtuner_write_it(tmp_path):
    from lmtune.dataset.encode import ConversationEncoder, encode_prompt

    tokenizer = _tokenizer(chatglm_dir(tmp_path), padding_side="right")
    prefix = [tokenizer.convert_tokens_to_ids("[gMASK]"), tokenizer.convert_tokens_to_ids("sop")]
    row = ConversationEncoder(tokenizer, 96)({"conversation": [{"input": "<|user|>\n Hi<|assistant|>\n",
                                                                "output": "Hello"}]})
    assert row["input_ids"][:2] == prefix and row["labels"][:2] == [-100, -100]
    assert encode_prompt(tokenizer, "<|user|>\n Hi<|assistant|>\n")[:2] == prefix


def test_configs_and_meta_models_of_a_chatglm_repository_come_from_the_port(tmp_path):
    from transformers import AutoConfig

    hub_dir = chatglm_dir(tmp_path)
    config = ports.from_pretrained(AutoConfig, str(hub_dir), trust_remote_code=True)
    assert config.model_type == "chatglm" and config.num_key_value_heads == 2 and config.num_hidden_layers == 2
    assert config.hub_layout["config"]["padded_vocab_size"] == 512
    hub = ports.hub_config(hub_dir)
    meta = ports.empty_model(ports.family_of(hub), hub, hub_dir)
    assert all(p.is_meta for p in meta.parameters()) and type(meta).__name__ == "ChatGLMNativeForCausalLM"
    assert "lmtune port of ChatGLM2 / ChatGLM3" in ports.implementation(hub_dir, trust_remote_code=True)
    mha = ports.hub_config(FIXTURES / "chatglm2_mha")
    assert ports.family_of(mha).code().model_class(mha).__name__ == "ChatGLMMHANativeForCausalLM"


def test_chatglm3s_2024_tokenizer_code_matches_all_nine_tokens_under_encode_special_tokens(tmp_path):
    """ChatGLM3's later tokenization_chatglm.py (for apply_chat_template) matches every appended token in the text
    under encode_special_tokens, the text between them encoded by SentencePiece on its own; checked against the
    sentencepiece library with that rule (no run of that code is recorded)."""
    import re

    import sentencepiece as spm

    hub_dir = chatglm_dir(tmp_path, fixture="chatglm3")
    later = "# SPTokenizer: '|'.join([re.escape(token) for token in special_tokens]) # for apply_chat_template\n"
    (hub_dir / "tokenization_chatglm.py").write_text(CHATGLM3_TOKENIZER_CODE + later)
    tokenizer = _tokenizer(hub_dir, encode_special_tokens=True)
    sp = spm.SentencePieceProcessor(model_file=str(hub_dir / "tokenizer.model"))
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    ids = {n: sp.vocab_size() + i for i, n in enumerate(names)}
    for text in ["[gMASK]sop<|user|>\n Say hello.<|assistant|>\n Hi</s>", "a [MASK] b eop<|observation|>x", "plain"]:
        expected = [ids["[gMASK]"], ids["sop"]]
        for piece in re.split("(" + "|".join(re.escape(n) for n in names) + ")", text):
            expected += [ids[piece]] if piece in ids else sp.encode(piece) if piece else []
        assert tokenizer(text)["input_ids"] == expected, text
    plain = _tokenizer(hub_dir)  # without the option nothing is matched, as before
    assert plain("a [MASK] b")["input_ids"] == [ids["[gMASK]"], ids["sop"], *sp.encode("a [MASK] b")]
