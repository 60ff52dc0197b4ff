"""Prompt templates: field shape, and rendered text against each model's chat format."""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import pytest

import lmtune
from lmtune.config.configdict import ConfigDict
from lmtune.dataset.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, get_template

REQUIRED = {"SYSTEM", "INSTRUCTION", "STOP_WORDS"}
OPTIONAL = {"SUFFIX", "SUFFIX_AS_EOS", "SEP"}

NAMES = [
    "default", "zephyr", "internlm_chat", "internlm2_chat", "moss_sft", "llama2_chat",
    "code_llama_chat", "chatglm2", "chatglm3", "qwen_chat", "baichuan_chat",
    "baichuan2_chat", "wizardlm", "wizardcoder", "vicuna", "deepseek_coder", "deepseek_moe",
    "deepseek_v2", "mistral", "mixtral", "minicpm", "minicpm3", "gemma", "cohere_chat",
    "llama3_chat", "phi3_chat", "qwen2_chat", "qwen2_5_chat", "qwen3_chat", "llama3_1_chat",
    "gemma2_chat", "gemma3_chat", "phi4_chat", "deepseek_v3", "glm4_chat", "internlm3_chat",
    "mistral_v3", "chatml",
]


def render(template, rounds, system=None, eos="</s>"):
    """Render [(input, output), ...] by the documented rule (BOS left to the encoder)."""
    parts = []
    for i, (inp, out) in enumerate(rounds):
        if i > 0:
            parts.append(template.get("SEP", ""))
        system_text = template.SYSTEM.format(system=system) if i == 0 and system else ""
        if "system" in fields(template.INSTRUCTION):  # the system block goes into the instruction
            parts.append(template.INSTRUCTION.format(input=inp, round=i + 1, system=system_text))
        else:
            parts.append(system_text + template.INSTRUCTION.format(input=inp, round=i + 1))
        parts.append(out + template.get("SUFFIX", ""))
        if not template.get("SUFFIX_AS_EOS", False):
            parts.append(eos)
    return "".join(parts)


def fields(fmt):
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


ROUNDS = [("Hi", "Hello!"), ("Who are you?", "An assistant.")]
SYS = "Be brief."

CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nAn assistant.<|im_end|>"
)

# Hand-written from each model's published chat format (BOS omitted, no separator
# after the last round, and the deviations documented in lmtune/dataset/templates.py).
EXPECTED = {
    "chatml": CHATML,
    "qwen_chat": CHATML,
    "qwen2_5_chat": CHATML,
    "internlm2_chat": CHATML,
    "internlm3_chat": CHATML,
    "llama3_chat": (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAn assistant.<|eot_id|>"
    ),
    "llama3_1_chat": (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAn assistant.<|eot_id|>"
    ),
    # Mistral's reference text: the system text opens the first [INST] (v3 puts it in the last:
    # documented), and the space before each answer is the tokenizer's own.
    "mistral": "[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Who are you? [/INST]An assistant.</s>",
    "mistral_v3": "[INST] Be brief.\n\nHi[/INST]Hello!</s>[INST] Who are you?[/INST]An assistant.</s>",
    "llama2_chat": ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello!</s>"
                    "[INST] Who are you? [/INST]An assistant.</s>"),
    "default": (
        "<|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:Hello!</s>\n"
        "<|User|>:Who are you?\n<|Bot|>:An assistant.</s>"
    ),
    "zephyr": (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nWho are you?</s>\n<|assistant|>\nAn assistant.</s>"
    ),
    "phi3_chat": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nWho are you?<|end|>\n<|assistant|>\nAn assistant.<|end|>"
    ),
    "phi4_chat": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>user<|im_sep|>Who are you?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>An assistant.<|im_end|>"
    ),
    "cohere_chat": (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who are you?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>An assistant.<|END_OF_TURN_TOKEN|>"
    ),
    "deepseek_v2": (
        "Be brief.\n\nUser: Hi\n\nAssistant: Hello!<｜end▁of▁sentence｜>"
        "User: Who are you?\n\nAssistant: An assistant.<｜end▁of▁sentence｜>"
    ),
    "deepseek_v3": (
        "Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>Who are you?<｜Assistant｜>An assistant.<｜end▁of▁sentence｜>"
    ),
    "chatglm2": (
        "Be brief.\n\n[Round 1]\n\n问：Hi\n\n答：Hello!</s>\n\n"
        "[Round 2]\n\n问：Who are you?\n\n答：An assistant.</s>"
    ),
    "gemma3_chat": (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWho are you?<end_of_turn>\n"
        "<start_of_turn>model\nAn assistant.<end_of_turn>"
    ),
    "qwen3_chat": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nAn assistant.<|im_end|>"
    ),
}


def test_all_names_present():
    assert set(NAMES) <= set(PROMPT_TEMPLATE)


@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATE))
def test_template_fields(name):
    tpl = PROMPT_TEMPLATE[name]
    assert isinstance(tpl, ConfigDict)
    assert REQUIRED <= set(tpl), f"{name} lacks {REQUIRED - set(tpl)}"
    assert set(tpl) <= REQUIRED | OPTIONAL, f"{name} has unknown keys {set(tpl) - REQUIRED - OPTIONAL}"
    assert fields(tpl.SYSTEM) == {"system"}
    assert "input" in fields(tpl.INSTRUCTION)
    assert fields(tpl.INSTRUCTION) <= {"input", "round", "system"}
    assert isinstance(tpl.STOP_WORDS, list)
    assert all(isinstance(w, str) and w for w in tpl.STOP_WORDS)
    # Optional keys appear only when they change something.
    if "SUFFIX" in tpl:
        assert isinstance(tpl.SUFFIX, str) and tpl.SUFFIX
    if "SEP" in tpl:
        assert isinstance(tpl.SEP, str) and tpl.SEP
    if "SUFFIX_AS_EOS" in tpl:
        assert tpl.SUFFIX_AS_EOS is True
        # A suffix that replaces EOS must exist, and generation must stop on it.
        assert tpl.get("SUFFIX")
        assert any(w in tpl.SUFFIX for w in tpl.STOP_WORDS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_official_format(name):
    assert render(PROMPT_TEMPLATE[name], ROUNDS, system=SYS) == EXPECTED[name]


def test_mistral_without_system_is_the_original_hf_text():
    # Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct HF template, minus BOS.
    expected = "[INST] Hi [/INST]Hello!</s>[INST] Who are you? [/INST]An assistant.</s>"
    assert render(PROMPT_TEMPLATE.mistral, ROUNDS) == expected
    assert render(PROMPT_TEMPLATE.mixtral, ROUNDS) == expected


def test_no_system_message_renders_no_system_block():
    out = render(PROMPT_TEMPLATE.chatml, ROUNDS)
    assert out.startswith("<|im_start|>user\nHi<|im_end|>")
    assert "system" not in out


def test_system_templates():
    for name in ("alpaca", "arxiv_gentile", "colorist", "coder", "lawyer", "medical", "sql", "moss_sft"):
        assert isinstance(SYSTEM_TEMPLATE[name], str) and SYSTEM_TEMPLATE[name].strip()
    assert "instruction that describes a task" in SYSTEM_TEMPLATE.alpaca


def test_get_template_by_name_is_a_copy():
    tpl = get_template("llama3_chat")
    assert tpl == PROMPT_TEMPLATE.llama3_chat
    tpl.STOP_WORDS.append("x")
    assert "x" not in PROMPT_TEMPLATE.llama3_chat.STOP_WORDS


def test_get_template_passes_dicts_through():
    custom = {"SYSTEM": "{system}\n", "INSTRUCTION": "Q: {input}\nA: ", "STOP_WORDS": []}
    tpl = get_template(custom)
    assert isinstance(tpl, ConfigDict)
    assert tpl.INSTRUCTION == "Q: {input}\nA: "
    same = ConfigDict(custom)
    assert get_template(same) is same


def test_get_template_unknown_name_suggests_close_match():
    with pytest.raises(KeyError) as info:
        get_template("llama3chat")
    message = str(info.value)
    assert "llama3chat" in message
    assert "llama3_chat" in message


def test_get_template_rejects_other_types():
    with pytest.raises(TypeError):
        get_template(3)


# ------------------------------------------------------------------ XTuner's templates on the xtuner.* path

XTUNER_RENDERINGS = Path(__file__).parent / "fixtures" / "xtuner_template_renderings.json"


def _xtuner_fixture() -> dict:
    return json.loads(XTUNER_RENDERINGS.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(_xtuner_fixture()["renderings"]))
def test_xtuner_import_path_renders_what_xtuner_0_2_0_rendered(name):
    """Every template name, through ``from xtuner.utils import PROMPT_TEMPLATE`` and lmtune's map function,
    renders XTuner 0.2.0's own ``template_map_fn`` output (tests/fixtures, benchmarks/xtuner_templates.py)."""
    from lmtune.compat.xtuner.utils import PROMPT_TEMPLATE as XTUNER_PROMPT_TEMPLATE
    from lmtune.dataset.map_fns import template_map_fn_factory

    fixture = _xtuner_fixture()
    assert fixture["xtuner_version"] == "0.2.0"
    map_fn = template_map_fn_factory(XTUNER_PROMPT_TEMPLATE[name])
    for probe, expected in fixture["renderings"][name].items():
        if "error" in expected:  # XTuner fails on a system message for a template without SYSTEM
            assert "SYSTEM" not in XTUNER_PROMPT_TEMPLATE[name]
            continue
        got = map_fn({"conversation": copy.deepcopy(fixture["probes"][probe])})["conversation"]
        assert got == expected, (name, probe)


def test_an_xtuner_config_gets_xtuners_templates_and_lmtunes_path_keeps_its_own(tmp_path):
    from lmtune.config import Config

    config = tmp_path / "cfg.py"
    config.write_text("from xtuner.utils import PROMPT_TEMPLATE\nfrom xtuner.utils.templates import "
                      "PROMPT_TEMPLATE as DIRECT\nfrom lmtune.dataset import PROMPT_TEMPLATE as OWN\n"
                      "xtuner_llama2 = PROMPT_TEMPLATE.llama2_chat\ndirect = DIRECT.mistral\n"
                      "own_llama2 = OWN.llama2_chat\nonly_lmtune = PROMPT_TEMPLATE.qwen3_chat\n")
    cfg = Config.fromfile(config)
    xtuner = json.loads((Path(lmtune.__file__).parent / "compat" / "xtuner" /
                         "xtuner_prompt_templates.json").read_text(encoding="utf-8"))["templates"]
    assert cfg.xtuner_llama2 == xtuner["llama2_chat"] and cfg.direct == xtuner["mistral"]
    assert cfg.own_llama2 == PROMPT_TEMPLATE.llama2_chat != cfg.xtuner_llama2
    assert cfg.only_lmtune == PROMPT_TEMPLATE.qwen3_chat  # names XTuner lacks come from lmtune's table
    differing = sorted(n for n in xtuner if n in PROMPT_TEMPLATE and xtuner[n] != dict(PROMPT_TEMPLATE[n]))
    assert {"llama2_chat", "chatglm2", "chatglm3", "baichuan_chat", "baichuan2_chat", "moss_sft", "minicpm",
            "gemma", "deepseek_moe", "mixtral", "deepseek_coder", "mistral", "zephyr"} <= set(differing)


def test_a_system_message_with_a_template_without_system_is_said_once(caplog, monkeypatch):
    from lmtune.compat.xtuner.utils import PROMPT_TEMPLATE as XTUNER_PROMPT_TEMPLATE
    from lmtune.core import device
    from lmtune.dataset.map_fns import template_map_fn_factory

    monkeypatch.setattr(device, "_warned", set())  # once per process: start this test's process afresh
    assert "SYSTEM" not in XTUNER_PROMPT_TEMPLATE.minicpm  # XTuner 0.2.0's minicpm entry
    map_fn = template_map_fn_factory(XTUNER_PROMPT_TEMPLATE.minicpm)
    caplog.set_level("WARNING", logger="lmtune")
    for _ in range(3):
        out = map_fn({"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello."}]})
    assert "Be brief." not in out["conversation"][0]["input"]
    said = [r.getMessage() for r in caplog.records if "has no SYSTEM format" in r.getMessage()]
    assert len(said) == 1
