"""``lmtune chat``: prompts as in training, stopping, history, and both CLI modes, on a tiny model."""

from __future__ import annotations

import argparse
import io
import json
import sys

import pytest
import torch

from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset.encode import ConversationEncoder
from lmtune.dataset.map_fns.template_map_fn import template_map_fn_factory
from lmtune.tools import chat as chat_mod
from lmtune.tools.chat import ChatSession, add_parser, interactive

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


class ForceAfter:
    """A logits processor that forces ``token`` once ``n`` tokens were generated."""

    def __init__(self, prompt_len: int, n: int, token: int) -> None:
        self.prompt_len, self.n, self.token = prompt_len, n, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len >= self.n:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0.0
        return scores


def test_prompt_ids_match_training_encoding_with_prompt_template(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template="qwen_chat", system=SYSTEM)
    session.history = [("What is the capital of France?", "Paris.")]
    ids = session.prompt_ids("And of Italy?")

    conversation = [{"system": SYSTEM, "input": "What is the capital of France?", "output": "Paris."},
                    {"input": "And of Italy?", "output": "Rome."}]
    row = template_map_fn_factory("qwen_chat")({"conversation": conversation})
    encoded = ConversationEncoder(tokenizer, None)(row)
    # the prompt part of the last round: everything before its first trained token
    last_answer_start = max(i for i, lab in enumerate(encoded["labels"])
                            if lab != IGNORE_INDEX and (i == 0 or encoded["labels"][i - 1] == IGNORE_INDEX))
    assert ids == encoded["input_ids"][:last_answer_start]
    text = tokenizer.decode(ids)
    assert text.count("<|im_start|>system") == 1
    assert text.endswith("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris.<|im_end|>\n<|im_start|>user" in text


def test_prompt_ids_match_chat_template_in_auto_mode(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template="auto", system=SYSTEM)
    session.history = [("Say hello.", "Hello!")]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again."}]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert session.prompt_ids("Again.") == list(expected)
    assert "<|im_end|>" in session.stop_words


@pytest.mark.parametrize("template", ["qwen_chat", "auto"])
def test_greedy_is_deterministic_and_stops_at_im_end(model, tokenizer, template):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    session = ChatSession(model, tokenizer, prompt_template=template, max_new_tokens=20)
    prompt_len = len(session.prompt_ids("Hello"))
    session.generation_kwargs = {"logits_processor": [ForceAfter(prompt_len, 3, im_end)]}
    streamed: list[str] = []
    first = session.chat("Hello", stream=streamed.append)
    session.reset()
    second = session.chat("Hello")
    assert first == second
    assert "".join(streamed) == first
    assert "<|im_end|>" not in first
    assert len(session.last_generated_ids) == 3  # stopped right at the forced <|im_end|>
    assert first == tokenizer.decode(session.last_generated_ids, skip_special_tokens=False)


def test_max_new_tokens_and_stop_strings(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template="qwen_chat", max_new_tokens=5)
    answer = session.chat("Hello")
    assert len(session.last_generated_ids) <= 5
    assert all(w not in answer for w in session.stop_words)
    if len(answer) > 2:  # a stop word met in the middle of the answer cuts it there
        word = answer[1:3]
        cut = ChatSession(model, tokenizer, prompt_template="qwen_chat", max_new_tokens=5,
                          stop_words=[word]).chat("Hello")
        assert word not in cut and answer.startswith(cut)


def test_reset_clears_history(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template="qwen_chat", system=SYSTEM, max_new_tokens=3)
    fresh = session.prompt_ids("Hi")
    session.chat("Hi")
    assert len(session.history) == 1
    assert session.prompt_ids("Hi") != fresh
    session.reset()
    assert session.history == []
    assert session.prompt_ids("Hi") == fresh


def test_plain_text_mode(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template=None, max_new_tokens=3)
    session.history = [("a", "b")]
    assert session.prompt_text("c") == "abc"


def _parser():
    parser = argparse.ArgumentParser(prog="lmtune")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def answers(monkeypatch):
    """The answers ChatSession.chat returns during a test."""
    outputs: list[str] = []
    real_chat = ChatSession.chat

    def recording_chat(self, text, stream=None):
        answer = real_chat(self, text, stream)
        outputs.append(answer)
        return answer

    monkeypatch.setattr(ChatSession, "chat", recording_chat)
    return outputs


def test_cli_prompts_from_arguments(tiny_model_dir, answers, capsys):
    rc = _run(["chat", tiny_model_dir, "--max-new-tokens", "4", "--prompt", "Hi", "--prompt", "Again"])
    assert rc == 0
    assert len(answers) == 2
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)


@pytest.mark.parametrize("separate", [False, True])
def test_cli_repeated_prompts_are_one_conversation_unless_separate(tiny_model_dir, monkeypatch, capsys, separate):
    histories: list[int] = []
    real_chat = ChatSession.chat

    def recording_chat(self, text, stream=None):
        histories.append(len(self.history))  # the earlier turns this answer sees
        return real_chat(self, text, stream)

    monkeypatch.setattr(ChatSession, "chat", recording_chat)
    argv = ["chat", tiny_model_dir, "--max-new-tokens", "3", "--prompt", "Hi", "--prompt", "Again", "--prompt", "X"]
    assert _run(argv + (["--separate"] if separate else [])) == 0
    assert histories == ([0, 0, 0] if separate else [0, 1, 2])
    assert len(capsys.readouterr().out.splitlines()) >= 3


def test_cli_prompts_from_stdin(tiny_model_dir, answers, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    rc = _run(["chat", tiny_model_dir, "--max-new-tokens", "4", "--prompt-template", "qwen_chat",
               "--system-template", "alpaca"])
    assert rc == 0
    assert len(answers) == 2
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_interactive_reset_and_exit(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", Terminal())
    seen = []
    lines = iter(["Hi", "reset", "Hello", "exit", "never read"])

    def fake_input(prompt):
        seen.append(prompt)
        return next(lines)

    monkeypatch.setattr(chat_mod, "_read_line", fake_input)
    rc = _run(["chat", tiny_model_dir, "--max-new-tokens", "3"])
    assert rc == 0
    assert seen == [">>> "] * 4
    assert "(history cleared)" in capsys.readouterr().out


def test_interactive_loop(model, tokenizer):
    session = ChatSession(model, tokenizer, prompt_template="auto", max_new_tokens=3)
    lines = iter(["Hi", "clear", "Hello", "quit"])
    out = io.StringIO()
    assert interactive(session, input_fn=lambda _: next(lines), stream=False, out=out) == 0
    assert len(session.history) == 1 and session.history[0][0] == "Hello"
    assert "(history cleared)" in out.getvalue()

    def eof(_):
        raise EOFError

    assert interactive(session, input_fn=eof, out=out) == 0


def test_default_prompt_template(tmp_path, tokenizer):
    from lmtune.tools.chat import default_prompt_template

    assert default_prompt_template(tokenizer, None, tmp_path) == "auto"
    (tmp_path / "lmtune_export.json").write_text('{"prompt_template": "qwen_chat"}', encoding="utf-8")
    assert default_prompt_template(tokenizer, None, tmp_path) == "qwen_chat"
    record = {"prompt_template": {"INSTRUCTION": "Q: {input}\nA:", "STOP_WORDS": ["\n"]}}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "lmtune_export.json").write_text(json.dumps(record), encoding="utf-8")
    assert default_prompt_template(tokenizer, adapter, tmp_path) == record["prompt_template"]
    assert default_prompt_template(type("T", (), {"chat_template": None})(), None, tmp_path / "x") is None


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_loads_the_model_quantized(tiny_model_dir, model, answers, capsys, bits):
    import bitsandbytes as bnb

    loaded, _ = chat_mod.load_for_chat(tiny_model_dir, bits=bits, torch_dtype="fp32")
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, layer) for m in loaded.modules()) == 14  # 7 linear layers in each of 2 blocks
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])
    with torch.no_grad():
        quantized, full = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    # quantization error, not a different model: the logits stay strongly correlated
    assert torch.corrcoef(torch.stack([quantized.flatten(), full.flatten()]))[0, 1] > 0.95
    assert _run(["chat", tiny_model_dir, "--bits", str(bits), "--max-new-tokens", "3", "--prompt", "Hi"]) == 0
    assert len(answers) == 1 and capsys.readouterr().out == answers[0] + "\n"
