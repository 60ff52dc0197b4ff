"""The data pipeline: map functions, templating, encoding, packing, collation, sampling.

Ends with the exactness check the design promises: a packed batch has the same
loss and gradients as its samples run one by one.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import OASST1_ROWS, alpaca_rows, write_jsonl
from datasets import Dataset, load_dataset
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset import DefaultSampler, process_hf_dataset
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.encode import ConversationEncoder, tokenizer_adds_bos
from lmtune.dataset.map_fns import (
    alpaca_map_fn,
    default_map_fn,
    oasst1_map_fn,
    openai_map_fn,
    pretrain_map_fn,
    template_map_fn_factory,
)
from lmtune.dataset.packing import best_fit_bins, pack_batch
from lmtune.dataset.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE
from lmtune.model import SupervisedFinetune

IGN = IGNORE_INDEX
QWEN = PROMPT_TEMPLATE.qwen_chat

# One two-round conversation with a system message, and its qwen_chat (ChatML) text piece by piece.
CONVERSATION = [
    {"system": "Be brief.", "input": "What is the capital of France?", "output": "Paris."},
    {"input": "And of Italy?", "output": "Rome."},
]
QWEN_PROMPT_1 = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                 "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
QWEN_PROMPT_2 = "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
QWEN_TEXT = QWEN_PROMPT_1 + "Paris.<|im_end|>" + "\n" + QWEN_PROMPT_2 + "Rome.<|im_end|>"


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_text(tokenizer, row) -> str:
    return decode(tokenizer, [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGN])


def templated(template, conversation) -> dict:
    return template_map_fn_factory(template)({"conversation": copy.deepcopy(conversation)})


# --------------------------------------------------------------------------------------------
# 1. Dataset map functions
# --------------------------------------------------------------------------------------------

def test_alpaca_map_fn_joins_instruction_and_input_under_the_alpaca_system():
    assert alpaca_map_fn({"instruction": "Translate to French.", "input": "cat", "output": "chat"}) == {
        "conversation": [{"system": SYSTEM_TEMPLATE.alpaca, "input": "Translate to French.\ncat", "output": "chat"}]
    }
    # An empty, blank or absent input leaves the instruction alone.
    for extra in ({"input": ""}, {"input": "  \n"}, {}):
        row = {"instruction": "Name a fruit.", "output": "An apple.", **extra}
        assert alpaca_map_fn(row)["conversation"] == [
            {"system": SYSTEM_TEMPLATE.alpaca, "input": "Name a fruit.", "output": "An apple."}]


def test_alpaca_map_fn_drops_nooutput_rows():
    assert alpaca_map_fn({"instruction": "Say nothing.", "input": "", "output": "<nooutput>"}) == {"conversation": []}
    assert alpaca_map_fn({"instruction": "Say nothing.", "input": "", "output": " <nooutput>\n"}) == {
        "conversation": []}


def test_oasst1_map_fn_splits_turns():
    assert oasst1_map_fn({"text": OASST1_ROWS[0]}) == {"conversation": [
        {"input": "What is the capital of France?", "output": "The capital of France is Paris."}]}
    assert oasst1_map_fn({"text": OASST1_ROWS[1]}) == {"conversation": [
        {"input": "Say hello.", "output": "Hello!"}, {"input": "Again, louder.", "output": "HELLO!"}]}


def test_oasst1_map_fn_drops_a_trailing_unanswered_human_turn():
    assert OASST1_ROWS[2].endswith("### Human: Another one?")
    assert oasst1_map_fn({"text": OASST1_ROWS[2]}) == {"conversation": [{"input": "Name a color.", "output": "Blue."}]}
    assert oasst1_map_fn({"text": "### Human: Anyone there?"}) == {"conversation": []}


def test_openai_map_fn_multi_turn_with_system_and_loss_flag():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "loss": False},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "loss": True},
        {"role": "user", "content": "Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    assert openai_map_fn({"messages": messages}) == {"conversation": [
        {"system": "Be brief.", "input": "Hi", "output": "Hello", "output_with_loss": False},
        {"input": "Capital of France?", "output": "Paris."},
        {"input": "Italy?", "output": "Rome."},
    ]}
    # Without a system message no round carries one.
    assert openai_map_fn({"messages": messages[1:3]}) == {"conversation": [
        {"input": "Hi", "output": "Hello", "output_with_loss": False}]}


def test_default_and_pretrain_map_fns():
    assert default_map_fn({"input": "Q", "output": "A"}) == {"conversation": [{"input": "Q", "output": "A"}]}
    assert default_map_fn({"input": "Q", "output": "A", "system": "S"}) == {
        "conversation": [{"input": "Q", "output": "A", "system": "S"}]}
    assert default_map_fn({"input": "Q", "output": "A", "system": ""}) == {
        "conversation": [{"input": "Q", "output": "A"}]}
    assert pretrain_map_fn({"text": "  The quick brown fox.\n"}) == {
        "conversation": [{"input": "", "output": "The quick brown fox.", "need_eos_token": False}]}


@pytest.mark.parametrize(("map_fn", "row", "field"), [
    (alpaca_map_fn, {"instruction": "Name a fruit.", "input": ""}, "output"),
    (alpaca_map_fn, {"input": "", "output": "An apple."}, "instruction"),
    (oasst1_map_fn, {"messages": []}, "text"),
    (openai_map_fn, {"text": "### Human: hi"}, "messages"),
    (default_map_fn, {"input": "Q"}, "output"),
    (default_map_fn, {"output": "A"}, "input"),
    (pretrain_map_fn, {"content": "plain text"}, "text"),
    # A row of a file that lacks a field reaches the map function as None (Arrow fills the column).
    (alpaca_map_fn, {"instruction": "Name a fruit.", "input": "", "output": None}, "output"),
    (default_map_fn, {"input": "Q", "output": None}, "output"),
    (pretrain_map_fn, {"text": None}, "text"),
])
def test_map_fn_names_a_missing_field(map_fn, row, field):
    with pytest.raises(ConfigError, match=f"no '{field}' field"):
        map_fn(row)


# --------------------------------------------------------------------------------------------
# 2. template_map_fn
# --------------------------------------------------------------------------------------------

def test_template_map_fn_renders_qwen_chat():
    assert templated(QWEN, CONVERSATION) == {"conversation": [
        {"system": "Be brief.", "input": QWEN_PROMPT_1, "output": "Paris.<|im_end|>",
         "need_eos_token": False, "sep": "\n"},
        {"input": QWEN_PROMPT_2, "output": "Rome.<|im_end|>", "need_eos_token": False, "sep": "\n"},
    ]}
    # By name: the same; and the caller's rows are left untouched.
    source = {"conversation": copy.deepcopy(CONVERSATION)}
    assert template_map_fn_factory("qwen_chat")(source) == templated(QWEN, CONVERSATION)
    assert source == {"conversation": CONVERSATION}


def test_template_map_fn_writes_system_only_when_given():
    for system in ({}, {"system": ""}, {"system": None}):
        out = templated(QWEN, [{"input": "Hi", "output": "Hello", **system}])
        assert out["conversation"][0]["input"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_map_fn_round_number_and_eos_rules():
    chatglm2 = templated(PROMPT_TEMPLATE.chatglm2, CONVERSATION)["conversation"]
    assert [t["input"] for t in chatglm2] == [
        "Be brief.\n\n[Round 1]\n\n问：What is the capital of France?\n\n答：",
        "[Round 2]\n\n问：And of Italy?\n\n答：",
    ]
    # No SUFFIX: the output is unchanged and the tokenizer's EOS ends it.
    assert [(t["output"], t["need_eos_token"], t["sep"]) for t in chatglm2] == [
        ("Paris.", True, "\n\n"), ("Rome.", True, "\n\n")]
    # No SEP in the template: an empty sep.
    llama3 = templated(PROMPT_TEMPLATE.llama3_chat, CONVERSATION)["conversation"]
    assert [(t["output"], t["need_eos_token"], t["sep"]) for t in llama3] == [
        ("Paris.<|eot_id|>", False, ""), ("Rome.<|eot_id|>", False, "")]
    # A round's own need_eos_token (pretrain) and output_with_loss are kept.
    turn = {"input": "", "output": "text", "need_eos_token": False, "output_with_loss": False}
    out = templated(PROMPT_TEMPLATE.default, [turn])["conversation"][0]
    assert (out["need_eos_token"], out["output_with_loss"]) == (False, False)


# --------------------------------------------------------------------------------------------
# 3. ConversationEncoder
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer plus a ``<s>`` BOS token that its post-processor puts first."""
    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def test_encoder_labels_only_answers_and_suffix(tiny_tokenizer):
    tok = tiny_tokenizer
    row = ConversationEncoder(tok, max_length=None)(templated(QWEN, CONVERSATION))
    p1, a1, sep = ids_of(tok, QWEN_PROMPT_1), ids_of(tok, "Paris.<|im_end|>"), ids_of(tok, "\n")
    p2, a2 = ids_of(tok, QWEN_PROMPT_2), ids_of(tok, "Rome.<|im_end|>")
    assert row["input_ids"] == p1 + a1 + sep + p2 + a2
    assert row["labels"] == [IGN] * len(p1) + a1 + [IGN] * len(sep) + [IGN] * len(p2) + a2
    assert row["length"] == len(row["input_ids"])
    # SUFFIX_AS_EOS: the suffix ends each answer (trained) and no EOS is added.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert row["labels"][-1] == row["input_ids"][-1] == im_end
    assert tok.eos_token_id not in row["input_ids"]
    assert trained_text(tok, row) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert decode(tok, row["input_ids"]) == QWEN_TEXT


def test_encoder_appends_and_trains_eos_without_suffix_as_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    row = ConversationEncoder(tok, max_length=None)(templated(PROMPT_TEMPLATE.default, CONVERSATION))
    p1 = ids_of(tok, "<|System|>:Be brief.\n<|User|>:What is the capital of France?\n<|Bot|>:")
    p2 = ids_of(tok, "<|User|>:And of Italy?\n<|Bot|>:")
    a1, a2, sep = ids_of(tok, "Paris."), ids_of(tok, "Rome."), ids_of(tok, "\n")
    assert row["input_ids"] == p1 + a1 + [eos] + sep + p2 + a2 + [eos]
    assert row["labels"] == [IGN] * len(p1) + a1 + [eos] + [IGN] * (len(sep) + len(p2)) + a2 + [eos]
    assert decode(tok, row["input_ids"]) == (
        "<|System|>:Be brief.\n<|User|>:What is the capital of France?\n<|Bot|>:Paris.<|endoftext|>\n"
        "<|User|>:And of Italy?\n<|Bot|>:Rome.<|endoftext|>")


def test_encoder_output_with_loss_false_masks_that_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = copy.deepcopy(CONVERSATION)
    conversation[0]["output_with_loss"] = False
    row = ConversationEncoder(tok, max_length=None)(templated(PROMPT_TEMPLATE.default, conversation))
    full = ConversationEncoder(tok, max_length=None)(templated(PROMPT_TEMPLATE.default, CONVERSATION))
    assert row["input_ids"] == full["input_ids"]
    assert trained_text(tok, row) == "Rome.<|endoftext|>"
    assert trained_text(tok, full) == "Paris.<|endoftext|>Rome.<|endoftext|>"


def test_encoder_reads_null_optional_fields_as_their_defaults(tiny_tokenizer):
    # Through datasets < 5 a list of dicts becomes an Arrow struct: a key one round lacks is None there.
    tok = tiny_tokenizer
    conversation = [dict(turn, output_with_loss=None, need_eos_token=None) for turn in CONVERSATION]
    expected = ConversationEncoder(tok, None)(templated(PROMPT_TEMPLATE.default, CONVERSATION))
    assert ConversationEncoder(tok, None)(templated(PROMPT_TEMPLATE.default, conversation)) == expected
    assert trained_text(tok, expected) == "Paris.<|endoftext|>Rome.<|endoftext|>"


def test_encoder_bos_exactly_once_and_only_for_a_bos_tokenizer(tiny_tokenizer, bos_tokenizer):
    example = templated(QWEN, CONVERSATION)
    assert tiny_tokenizer.bos_token_id is None and not tokenizer_adds_bos(tiny_tokenizer)
    plain = ConversationEncoder(tiny_tokenizer, None)(example)

    bos = bos_tokenizer.bos_token_id
    assert tokenizer_adds_bos(bos_tokenizer)
    row = ConversationEncoder(bos_tokenizer, None)(example)
    assert row["input_ids"] == [bos] + plain["input_ids"]
    assert row["labels"] == [IGN] + plain["labels"]
    assert row["input_ids"].count(bos) == 1
    assert decode(bos_tokenizer, row["input_ids"]) == "<s>" + QWEN_TEXT

    # A tokenizer that names a BOS token but never writes it gets none either.
    named_only = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(bos_tokenizer.backend_tokenizer),
                                         bos_token="<s>", eos_token="<|endoftext|>")
    named_only.backend_tokenizer.post_processor = copy.deepcopy(tiny_tokenizer.backend_tokenizer.post_processor)
    assert not tokenizer_adds_bos(named_only)
    assert ConversationEncoder(named_only, None)(example)["input_ids"] == plain["input_ids"]


def test_encoder_truncates_to_max_length(tiny_tokenizer):
    example = templated(QWEN, CONVERSATION)
    full = ConversationEncoder(tiny_tokenizer, None)(example)
    n = len(full["input_ids"])
    for max_length in (5, len(ids_of(tiny_tokenizer, QWEN_PROMPT_1)) + 2, n - 1):
        row = ConversationEncoder(tiny_tokenizer, max_length)(example)
        assert row == {"input_ids": full["input_ids"][:max_length], "labels": full["labels"][:max_length],
                       "length": max_length, "truncated": True}
    assert ConversationEncoder(tiny_tokenizer, n)(example) == full
    assert ConversationEncoder(tiny_tokenizer, n + 10)(example) == full


def test_encoded_text_is_the_rendered_conversation(tiny_tokenizer):
    # Every source format, templated and encoded, decodes back to exactly its rendered text.
    encoder = ConversationEncoder(tiny_tokenizer, None)
    for text in OASST1_ROWS:
        conversation = oasst1_map_fn({"text": text})["conversation"]
        if not conversation:
            continue
        rendered = "\n".join(f"<|im_start|>user\n{t['input']}<|im_end|>\n<|im_start|>assistant\n"
                             f"{t['output']}<|im_end|>" for t in conversation)
        row = encoder(templated(QWEN, conversation))
        assert decode(tiny_tokenizer, row["input_ids"]) == rendered
        assert trained_text(tiny_tokenizer, row) == "".join(t["output"] + "<|im_end|>" for t in conversation)
    for source in alpaca_rows():
        conversation = alpaca_map_fn(source)["conversation"]
        if not conversation:
            continue
        row = encoder(templated(QWEN, conversation))
        user = source["instruction"] + (f"\n{source['input']}" if source["input"] else "")
        assert decode(tiny_tokenizer, row["input_ids"]) == (
            f"<|im_start|>system\n{SYSTEM_TEMPLATE.alpaca}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{source['output']}<|im_end|>")
    row = encoder(pretrain_map_fn({"text": "The quick brown fox jumps over the lazy dog."}))
    assert row["labels"] == row["input_ids"] == ids_of(tiny_tokenizer, "The quick brown fox jumps over the lazy dog.")


# --------------------------------------------------------------------------------------------
# 4. process_hf_dataset
# --------------------------------------------------------------------------------------------

def alpaca_dataset(data_file, tokenizer, **kwargs):
    kwargs.setdefault("max_length", 512)
    return process_hf_dataset(
        dataset=dict(type=load_dataset, path="json", data_files=data_file), tokenizer=tokenizer,
        dataset_map_fn=alpaca_map_fn, template_map_fn=template_map_fn_factory(QWEN), **kwargs)


def oasst1_dataset(data_dir, tokenizer, **kwargs):
    return process_hf_dataset(
        dataset=dict(type=load_dataset, path=data_dir), tokenizer=tokenizer,
        dataset_map_fn=oasst1_map_fn, template_map_fn=template_map_fn_factory(QWEN), **kwargs)


def samples_of(unpacked) -> list[tuple]:
    """Unpacked rows as (input_ids, labels) with the first label ignored, as packing writes it."""
    return sorted((tuple(r["input_ids"]), (IGN, *r["labels"][1:])) for r in unpacked)


def cut_packed(packed) -> list[tuple]:
    out = []
    for row in packed:
        start = 0
        for n in row["num_tokens"]:
            out.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    return sorted(out)


def test_process_unpacked_alpaca_from_a_json_file(alpaca_file, tiny_tokenizer, tiny_model_dir):
    tokenizer_cfg = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tiny_model_dir)
    ds = alpaca_dataset(alpaca_file, tokenizer_cfg, pack_to_max_length=False)
    kept = [r for r in alpaca_rows() * 3 if r["output"] != "<nooutput>"]
    assert len(ds) == len(kept) == 15
    assert {"input_ids", "labels", "length"} <= set(ds.column_names)
    for row, source in zip(ds, kept):  # unpacked rows keep the file's order
        expected = alpaca_map_fn(source)["conversation"]
        assert row == {**row, **ConversationEncoder(tiny_tokenizer, 512)(templated(QWEN, expected))}
        assert trained_text(tiny_tokenizer, row) == source["output"] + "<|im_end|>"


@pytest.mark.parametrize("max_length", [48, 160])
def test_process_packed_keeps_every_sample_whole(oasst1_dir, tiny_tokenizer, max_length):
    unpacked = oasst1_dataset(oasst1_dir, tiny_tokenizer, max_length=max_length, pack_to_max_length=False)
    packed = oasst1_dataset(oasst1_dir, tiny_tokenizer, max_length=max_length, pack_to_max_length=True)
    assert len(unpacked) == 24  # every oasst1 row has an answer
    assert set(packed.column_names) == {"input_ids", "labels", "num_tokens", "length"}
    assert len(packed) < len(unpacked)
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"] == sum(row["num_tokens"])
        assert row["length"] <= max_length
    assert max(r["length"] for r in unpacked) <= max_length
    assert cut_packed(packed) == samples_of(unpacked)


def test_process_packed_alpaca_preserves_samples(alpaca_file, tiny_tokenizer):
    unpacked = alpaca_dataset(alpaca_file, tiny_tokenizer, max_length=128, pack_to_max_length=False)
    packed = alpaca_dataset(alpaca_file, tiny_tokenizer, max_length=128)
    assert all(sum(r["num_tokens"]) == r["length"] <= 128 for r in packed)
    assert cut_packed(packed) == samples_of(unpacked)


def test_process_drops_rows_without_trained_tokens(tiny_tokenizer):
    long_question = " ".join(["What is the capital of France?"] * 20)
    rows = [
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "loss": False}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    ds = process_hf_dataset(Dataset.from_list(rows), tokenizer=tiny_tokenizer, max_length=40,
                            dataset_map_fn=openai_map_fn, template_map_fn=template_map_fn_factory(QWEN),
                            pack_to_max_length=False)
    assert len(ds) == 1
    assert decode(tiny_tokenizer, ds[0]["input_ids"]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>")

    # Plain text of one token has nothing to predict (no token before it).
    text = [{"text": "The"}, {"text": "The quick brown fox."}]
    ds = process_hf_dataset(Dataset.from_list(text), tokenizer=tiny_tokenizer, max_length=40,
                            dataset_map_fn=pretrain_map_fn, pack_to_max_length=False)
    assert len(ids_of(tiny_tokenizer, "The")) == 1
    assert [decode(tiny_tokenizer, r["input_ids"]) for r in ds] == ["The quick brown fox."]


def test_process_max_dataset_length_subsamples(oasst1_dir, tiny_tokenizer):
    full = oasst1_dataset(oasst1_dir, tiny_tokenizer, max_length=256, pack_to_max_length=False)
    small = oasst1_dataset(oasst1_dir, tiny_tokenizer, max_length=256, pack_to_max_length=False,
                           max_dataset_length=5)
    again = oasst1_dataset(oasst1_dir, tiny_tokenizer, max_length=256, pack_to_max_length=False,
                           max_dataset_length=5)
    assert len(small) == 5
    assert small["input_ids"] == again["input_ids"]
    assert all(ids in full["input_ids"] for ids in small["input_ids"])


def test_process_names_the_failing_row(tmp_path, alpaca_file, tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"map_fn failed on row 0 of .*alpaca.jsonl: a row has no 'text'"):
        process_hf_dataset(dict(type=load_dataset, path="json", data_files=alpaca_file), tokenizer=tiny_tokenizer,
                           max_length=64, dataset_map_fn=oasst1_map_fn)
    rows = [{"input": "Q", "output": "A"}] * 3 + [{"input": "Q"}]
    data = str(write_jsonl(tmp_path / "default.jsonl", rows))
    with pytest.raises(ConfigError, match=r"dataset_map_fn failed on row 3 of .*: a row has no 'output' field"):
        process_hf_dataset(dict(type=load_dataset, path="json", data_files=data), tokenizer=tiny_tokenizer,
                           max_length=64, dataset_map_fn=default_map_fn)
    with pytest.raises(ConfigError, match="did you mean 'alpaca'"):
        process_hf_dataset(Dataset.from_list(alpaca_rows()), tokenizer=tiny_tokenizer, max_length=64,
                           dataset_map_fn="alpacca")


def test_process_accepts_a_format_name(tiny_tokenizer):
    by_name = process_hf_dataset(Dataset.from_list(alpaca_rows()), tokenizer=tiny_tokenizer, max_length=256,
                                 dataset_map_fn="alpaca", template_map_fn=template_map_fn_factory(QWEN),
                                 pack_to_max_length=False)
    by_fn = process_hf_dataset(Dataset.from_list(alpaca_rows()), tokenizer=tiny_tokenizer, max_length=256,
                               dataset_map_fn=alpaca_map_fn, template_map_fn=template_map_fn_factory(QWEN),
                               pack_to_max_length=False)
    assert len(by_name) == 5
    assert by_name["input_ids"] == by_fn["input_ids"] and by_name["labels"] == by_fn["labels"]


# --------------------------------------------------------------------------------------------
# 5. best_fit_bins
# --------------------------------------------------------------------------------------------

def test_best_fit_bins_small_case():
    assert best_fit_bins([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert best_fit_bins([8, 1, 8], 8) == [[0], [2], [1]]
    assert best_fit_bins([], 8) == []


def test_best_fit_bins_covers_every_index_once_within_capacity():
    rng = random.Random(0)
    for capacity in (1, 7, 64, 512):
        lengths = [rng.randint(1, capacity) for _ in range(300)]
        bins = best_fit_bins(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        # No two bins could be merged: best fit only opens a bin when nothing open has room.
        loads = sorted(sum(lengths[i] for i in b) for b in bins)
        assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_pack_batch_sets_num_tokens_and_first_labels():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[1, 2, 3], [4, 5], [IGN, 7, 8, 9]]}
    assert pack_batch(batch, max_length=5) == {
        "input_ids": [[6, 7, 8, 9], [1, 2, 3, 4, 5]],
        "labels": [[IGN, 7, 8, 9], [IGN, 2, 3, IGN, 5]],
        "num_tokens": [[4], [3, 2]],
        "length": [4, 5],
    }


# --------------------------------------------------------------------------------------------
# 6. default_collate_fn
# --------------------------------------------------------------------------------------------

ROWS = [
    {"input_ids": [5, 6, 7], "labels": [IGN, 6, 7], "num_tokens": [2, 1]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [IGN, 9, 10, IGN, 12], "num_tokens": [3, 2]},
    {"input_ids": [13], "labels": [13]},
]


def test_collate_right_pads_and_restarts_positions():
    batch = default_collate_fn(ROWS, pad_index=1)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 12], [13, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGN, 6, 7, IGN, IGN], [IGN, 9, 10, IGN, 12], [13, IGN, IGN, IGN, IGN]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert all(t.dtype == torch.long for t in batch.values())
    # The default pad index, and one row (no padding).
    assert default_collate_fn(ROWS[:1])["input_ids"].tolist() == [[5, 6, 7]]
    assert default_collate_fn(ROWS)["input_ids"][0].tolist() == [5, 6, 7, 0, 0]


def test_collate_varlen_adds_cumulative_lengths():
    batch = default_collate_fn(ROWS, pad_index=1, use_varlen_attn=True)
    assert [c.tolist() for c in batch["cumulative_len"]] == [[0, 2, 3, 5], [0, 3, 5], [0, 1, 5]]
    assert all(c.dtype == torch.int32 for c in batch["cumulative_len"])
    assert batch["max_seqlen"] == [2, 3, 4]
    assert batch["input_ids"].tolist() == default_collate_fn(ROWS, pad_index=1)["input_ids"].tolist()


# --------------------------------------------------------------------------------------------
# 7. Exactness: packing and padding do not change the loss or the gradients
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sft(tiny_model_dir):
    model = SupervisedFinetune(
        llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=tiny_model_dir,
                 dtype=torch.float32),
        use_activation_checkpointing=False)
    return model.eval()


@pytest.fixture(scope="module")
def oasst1_samples(tiny_tokenizer) -> list[dict]:
    ds = process_hf_dataset(Dataset.from_list([{"text": t} for t in OASST1_ROWS]), tokenizer=tiny_tokenizer,
                            max_length=256, dataset_map_fn=oasst1_map_fn,
                            template_map_fn=template_map_fn_factory(QWEN), pack_to_max_length=False)
    samples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    assert len(samples) == 6
    return samples


def run(model, rows, **collate_kwargs) -> tuple[torch.Tensor, int]:
    out = model(**default_collate_fn(rows, pad_index=1, **collate_kwargs))
    return out["loss_sum"], int(out["num_tokens"])


def packed_rows(samples, groups) -> list[dict]:
    rows = []
    for group in groups:
        chosen = [samples[i] for i in group]
        packed = pack_batch({"input_ids": [s["input_ids"] for s in chosen],
                             "labels": [s["labels"] for s in chosen]}, max_length=10_000)
        assert len(packed["input_ids"]) == 1
        rows.append({k: v[0] for k, v in packed.items()})
    return rows


def test_packed_loss_equals_unpacked_loss(tiny_sft, oasst1_samples):
    with torch.no_grad():
        singles = [run(tiny_sft, [s]) for s in oasst1_samples]
        loss_sum = sum(float(s) for s, _ in singles)
        num_tokens = sum(n for _, n in singles)
        assert num_tokens == sum(sum(x != IGN for x in s["labels"][1:]) for s in oasst1_samples)

        one_row = packed_rows(oasst1_samples, [range(6)])
        assert len(one_row[0]["num_tokens"]) == 6
        for rows in (one_row, packed_rows(oasst1_samples, [[0, 2, 4], [1, 5], [3]])):
            packed_sum, packed_tokens = run(tiny_sft, rows)
            assert packed_tokens == num_tokens
            assert float(packed_sum) == pytest.approx(loss_sum, rel=1e-5)
            out = tiny_sft(**default_collate_fn(rows, pad_index=1))
            assert float(out["loss"]) == pytest.approx(loss_sum / num_tokens, rel=1e-5)

        # The check has teeth: the same row with positions running on (one long sequence) differs.
        batch = default_collate_fn(one_row)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        assert float(tiny_sft(**batch)["loss_sum"]) != pytest.approx(loss_sum, rel=1e-3)


def test_padded_batch_per_token_loss_equals_separate_runs(tiny_sft, oasst1_samples):
    short, long = oasst1_samples[5], oasst1_samples[1]
    assert len(short["input_ids"]) < len(long["input_ids"])

    def token_losses(rows):
        batch = default_collate_fn(rows, pad_index=1)
        logits = tiny_sft.llm(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGN)], 1)
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGN, reduction="none")

    with torch.no_grad():
        together = token_losses([short, long])
        for i, sample in enumerate((short, long)):
            n = len(sample["input_ids"])
            torch.testing.assert_close(together[i, :n], token_losses([sample])[0], rtol=1e-5, atol=1e-6)
            assert together[i, n:].abs().sum() == 0
        padded_sum, padded_tokens = run(tiny_sft, [short, long])
        separate = [run(tiny_sft, [s]) for s in (short, long)]
    assert padded_tokens == sum(n for _, n in separate)
    assert float(padded_sum) == pytest.approx(sum(float(s) for s, _ in separate), rel=1e-5)


def test_packed_gradients_equal_unpacked_gradients(tiny_sft, oasst1_samples):
    params = {n: p for n, p in tiny_sft.named_parameters() if p.requires_grad}
    tiny_sft.zero_grad(set_to_none=True)
    for sample in oasst1_samples:
        run(tiny_sft, [sample])[0].backward()
    unpacked = {n: p.grad.clone() for n, p in params.items()}

    tiny_sft.zero_grad(set_to_none=True)
    run(tiny_sft, packed_rows(oasst1_samples, [range(6)]))[0].backward()
    packed = {n: p.grad.clone() for n, p in params.items()}
    tiny_sft.zero_grad(set_to_none=True)

    assert packed.keys() == unpacked.keys() and len(packed) > 0
    for name, grad in unpacked.items():
        assert grad.abs().sum() > 0, name
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


# --------------------------------------------------------------------------------------------
# 8. DefaultSampler
# --------------------------------------------------------------------------------------------

def test_sampler_order_depends_only_on_seed_and_epoch():
    data = list(range(50))
    first = DefaultSampler(data, seed=7)
    order = list(first)
    assert sorted(order) == data and order != data and len(first) == 50
    assert list(DefaultSampler(data, seed=7)) == order
    assert list(first) == order  # iterating again repeats the epoch
    first.set_epoch(1)
    epoch1 = list(first)
    assert sorted(epoch1) == data and epoch1 != order
    other = DefaultSampler(data, seed=7)
    other.set_epoch(1)
    assert list(other) == epoch1
    assert list(DefaultSampler(data, seed=8)) != order


def test_sampler_skip_resumes_the_same_order():
    data = list(range(50))
    sampler = DefaultSampler(data, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    sampler.skip(17)
    assert list(sampler) == order[17:]
    assert list(sampler) == order  # the skip applies to one iteration only
    sampler.skip(50)
    assert list(sampler) == []


def test_sampler_without_shuffle_is_sequential():
    sampler = DefaultSampler(list(range(10)), shuffle=False, seed=5)
    assert list(sampler) == list(range(10))
    sampler.set_epoch(3)
    assert list(sampler) == list(range(10))
    sampler.skip(4)
    assert list(sampler) == list(range(4, 10))
