"""Every dataset map function against hand-written rows in its source format."""

from __future__ import annotations

import json

import pytest

from lmtune.config import ConfigError
from lmtune.dataset import map_fns
from lmtune.dataset.map_fns import (
    DATASET_FORMAT_MAPPING,
    alpaca_map_fn,
    alpaca_zh_map_fn,
    arxiv_map_fn,
    code_alpaca_map_fn,
    colors_map_fn,
    crime_kg_assitant_map_fn,
    default_map_fn,
    law_reference_map_fn,
    medical_map_fn,
    msagent_react_map_fn,
    oasst1_map_fn,
    openai_map_fn,
    openorca_map_fn,
    pretrain_map_fn,
    sharegpt_map_fn,
    sql_map_fn,
    stack_exchange_map_fn,
    template_map_fn_factory,
    tiny_codes_map_fn,
    wizardlm_map_fn,
)
from lmtune.dataset.map_fns.msagent_map_fn import REACT_SYSTEM
from lmtune.dataset.templates import SYSTEM_TEMPLATE

DROPPED = {"conversation": []}


def one_round(input_text: str, output: str, system: str | None = None) -> dict:
    turn = {"input": input_text, "output": output}
    if system is not None:
        turn["system"] = system
    return {"conversation": [turn]}


# --------------------------------------------------------------------------------------------
# Single-turn formats
# --------------------------------------------------------------------------------------------

def test_alpaca():
    row = {"instruction": "Classify the sentiment.", "input": "I loved this film.", "output": "Positive"}
    assert alpaca_map_fn(row) == one_round("Classify the sentiment.\nI loved this film.", "Positive",
                                           SYSTEM_TEMPLATE.alpaca)
    row = {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."}
    assert alpaca_map_fn(row) == one_round("Give three tips for staying healthy.", "1. Eat well.",
                                           SYSTEM_TEMPLATE.alpaca)
    assert alpaca_map_fn({"instruction": "Draw a cat.", "input": "", "output": "<nooutput>"}) == DROPPED


def test_alpaca_zh_has_no_system_prompt():
    row = {"instruction_zh": "把这句话翻译成英文。", "input_zh": "你好，世界", "output_zh": "Hello, world"}
    assert alpaca_zh_map_fn(row) == one_round("把这句话翻译成英文。\n你好，世界", "Hello, world")
    row = {"instruction_zh": "说出一种水果。", "input_zh": "", "output_zh": "苹果"}
    assert alpaca_zh_map_fn(row) == one_round("说出一种水果。", "苹果")
    # XTuner's alpaca_zh rows also carry the English columns; they are ignored.
    row = {"instruction": "Name a fruit.", "input": "", "output": "Apple", **row}
    assert alpaca_zh_map_fn(row) == one_round("说出一种水果。", "苹果")


def test_medical():
    row = {"instruction": "头痛应该怎么办？", "input": "持续三天，伴有发热。", "output": "建议尽快就医。"}
    assert medical_map_fn(row) == one_round("头痛应该怎么办？\n持续三天，伴有发热。", "建议尽快就医。",
                                            SYSTEM_TEMPLATE.medical)
    row = {"instruction": "What is a normal resting heart rate?", "input": "", "output": "60 to 100 bpm."}
    assert medical_map_fn(row) == one_round("What is a normal resting heart rate?", "60 to 100 bpm.",
                                            SYSTEM_TEMPLATE.medical)


def test_code_alpaca_and_tiny_codes_use_the_coder_system():
    row = {"prompt": "Write a Python function that reverses a string.",
           "completion": "def reverse(s):\n    return s[::-1]"}
    assert code_alpaca_map_fn(row) == one_round(row["prompt"], row["completion"], SYSTEM_TEMPLATE.coder)
    row = {"prompt": "Build a Rust module snippet that counts words.", "main_topic": "Text",
           "programming_language": "Rust", "response": "fn count(s: &str) -> usize { s.split_whitespace().count() }"}
    assert tiny_codes_map_fn(row) == one_round(row["prompt"], row["response"], SYSTEM_TEMPLATE.coder)


def test_sql():
    row = {"context": "CREATE TABLE head (age INTEGER)",
           "question": "How many heads of the departments are older than 56 ?",
           "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}
    assert sql_map_fn(row) == one_round(
        "CREATE TABLE head (age INTEGER)\nHow many heads of the departments are older than 56 ?",
        "SELECT COUNT(*) FROM head WHERE age > 56", SYSTEM_TEMPLATE.sql)


def test_stack_exchange_has_no_system():
    row = {"qid": 7, "question": "How do I undo the last git commit?", "date": "2020-01-01",
           "metadata": ["https://stackoverflow.com/q/7"], "response": "git reset --soft HEAD~1"}
    assert stack_exchange_map_fn(row) == one_round(row["question"], row["response"])


def test_openorca_system_prompt_only_when_given():
    row = {"id": "flan.1", "system_prompt": "You are an AI assistant. Think step by step.",
           "question": "Is 17 a prime number?", "response": "Yes, 17 is prime."}
    assert openorca_map_fn(row) == one_round("Is 17 a prime number?", "Yes, 17 is prime.",
                                             "You are an AI assistant. Think step by step.")
    row["system_prompt"] = ""
    assert openorca_map_fn(row) == one_round("Is 17 a prime number?", "Yes, 17 is prime.")


def test_arxiv_joins_a_wrapped_title():
    row = {"id": "0704.0001", "title": "Calculation of prompt diphoton production cross sections\n  at Tevatron",
           "abstract": "  A fully differential calculation in perturbative QCD is presented.\n"}
    assert arxiv_map_fn(row) == one_round(
        "A fully differential calculation in perturbative QCD is presented.",
        "Calculation of prompt diphoton production cross sections at Tevatron", SYSTEM_TEMPLATE.arxiv_gentile)


def test_colors_leaves_the_colour_name_out():
    row = {"color": "#2F4F4F", "description": "Dark slate gray: a deep, muted grey with a hint of green."}
    assert colors_map_fn(row) == one_round("a deep, muted grey with a hint of green.", "#2F4F4F",
                                           SYSTEM_TEMPLATE.colorist)
    row = {"color": "#FFD700", "description": "A warm, shining golden yellow"}
    assert colors_map_fn(row) == one_round("A warm, shining golden yellow", "#FFD700", SYSTEM_TEMPLATE.colorist)


def test_law_formats_use_the_lawyer_system():
    row = {"question": "劳动合同没有签字有效吗？", "answer": "一般不成立，但可依事实劳动关系主张权利。",
           "reference": ["《劳动合同法》第十条"]}
    assert law_reference_map_fn(row) == one_round(row["question"], row["answer"], SYSTEM_TEMPLATE.lawyer)
    row = {"input": "盗窃罪的立案标准是什么？", "output": "盗窃公私财物数额较大的，应当立案。"}
    assert crime_kg_assitant_map_fn(row) == one_round(row["input"], row["output"], SYSTEM_TEMPLATE.lawyer)


def test_default_and_pretrain():
    assert default_map_fn({"input": "2+2?", "output": "4"}) == one_round("2+2?", "4")
    assert default_map_fn({"input": "2+2?", "output": "4", "system": "Be terse."}) == one_round(
        "2+2?", "4", "Be terse.")
    assert pretrain_map_fn({"text": "\nOnce upon a time.  \n"}) == {
        "conversation": [{"input": "", "output": "Once upon a time.", "need_eos_token": False}]}


def test_numbers_read_from_csv_become_text():
    assert default_map_fn({"input": "2+2?", "output": 4}) == one_round("2+2?", "4")


SINGLE_TURN_FIELDS = [
    (alpaca_map_fn, {"instruction": "i", "input": "", "output": "o"}, ["instruction", "output"]),
    (alpaca_zh_map_fn, {"instruction_zh": "i", "input_zh": "", "output_zh": "o"}, ["instruction_zh", "output_zh"]),
    (medical_map_fn, {"instruction": "i", "input": "", "output": "o"}, ["instruction", "output"]),
    (code_alpaca_map_fn, {"prompt": "p", "completion": "c"}, ["prompt", "completion"]),
    (tiny_codes_map_fn, {"prompt": "p", "response": "r"}, ["prompt", "response"]),
    (sql_map_fn, {"context": "c", "question": "q", "answer": "a"}, ["context", "question", "answer"]),
    (stack_exchange_map_fn, {"question": "q", "response": "r"}, ["question", "response"]),
    (openorca_map_fn, {"system_prompt": "", "question": "q", "response": "r"}, ["question", "response"]),
    (arxiv_map_fn, {"abstract": "a", "title": "t"}, ["abstract", "title"]),
    (colors_map_fn, {"description": "d: e", "color": "#000000"}, ["description", "color"]),
    (law_reference_map_fn, {"question": "q", "answer": "a"}, ["question", "answer"]),
    (crime_kg_assitant_map_fn, {"input": "i", "output": "o"}, ["input", "output"]),
    (default_map_fn, {"input": "i", "output": "o"}, ["input", "output"]),
    (pretrain_map_fn, {"text": "t"}, ["text"]),
]


@pytest.mark.parametrize(
    ("map_fn", "row", "field"),
    [(fn, row, field) for fn, row, fields in SINGLE_TURN_FIELDS for field in fields],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_single_turn_missing_field(map_fn, row, field):
    assert map_fn(row)["conversation"]  # the full row maps
    absent = {k: v for k, v in row.items() if k != field}
    with pytest.raises(ConfigError, match=f"no '{field}' field, which {map_fn.__name__} needs"):
        map_fn(absent)
    with pytest.raises(ConfigError, match=f"no '{field}' field"):  # Arrow fills a missing column with None
        map_fn({**row, field: None})
    with pytest.raises(ConfigError, match=f"field '{field}' is a list, not text"):
        map_fn({**row, field: ["not", "text"]})


# --------------------------------------------------------------------------------------------
# oasst1
# --------------------------------------------------------------------------------------------

def test_oasst1_multi_turn():
    text = ("### Human: Can you explain recursion?### Assistant: A function that calls itself."
            "### Human: Give an example.### Assistant: ### Step 1\nfactorial(n) = n * factorial(n - 1)")
    assert oasst1_map_fn({"text": text}) == {"conversation": [
        {"input": "Can you explain recursion?", "output": "A function that calls itself."},
        # a Markdown heading inside an answer is not a turn marker
        {"input": "Give an example.", "output": "### Step 1\nfactorial(n) = n * factorial(n - 1)"},
    ]}


def test_oasst1_drops_unanswered_and_unasked_turns():
    text = "preamble ### Assistant: Hi!### Human: Name a planet.### Assistant: Mars.### Human: Another?"
    assert oasst1_map_fn({"text": text}) == one_round("Name a planet.", "Mars.")
    assert oasst1_map_fn({"text": "### Human: Anyone there?"}) == DROPPED
    with pytest.raises(ConfigError, match="no 'text' field, which oasst1_map_fn needs"):
        oasst1_map_fn({"conversations": []})


# --------------------------------------------------------------------------------------------
# openai
# --------------------------------------------------------------------------------------------

def test_openai_multi_turn_with_system_and_loss_flags():
    messages = [
        {"role": "assistant", "content": "How can I help?"},  # nothing asked it: dropped
        {"role": "system", "content": "You are a geography tutor."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima.", "loss": False},
        {"role": "user", "content": "Capital of Chile?"},
        {"role": "assistant", "content": "Santiago.", "loss": "False"},
        {"role": "user", "content": "Capital of Bolivia?"},
        {"role": "assistant", "content": "Sucre.", "loss": "true"},
        {"role": "user", "content": "And Ecuador?"},
    ]
    assert openai_map_fn({"messages": messages}) == {"conversation": [
        {"system": "You are a geography tutor.", "input": "Capital of Peru?", "output": "Lima.",
         "output_with_loss": False},
        {"input": "Capital of Chile?", "output": "Santiago.", "output_with_loss": False},
        {"input": "Capital of Bolivia?", "output": "Sucre."},
    ]}


def test_openai_merges_consecutive_messages_and_takes_a_system_midway():
    messages = [
        {"role": "user", "content": "Here is a list: 3, 1, 2."},
        {"role": "user", "content": "Sort it."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "assistant", "content": "Anything else?", "loss": False},
        {"role": "system", "content": "Answer in French from now on."},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "3, 2, 1."},
    ]
    assert openai_map_fn({"messages": messages}) == {"conversation": [
        # merged outputs are trained only if every part was
        {"input": "Here is a list: 3, 1, 2.\nSort it.", "output": "1, 2, 3.\nAnything else?",
         "output_with_loss": False},
        {"system": "Answer in French from now on.", "input": "Reverse it.", "output": "3, 2, 1."},
    ]}


def test_openai_text_content_parts():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]},
                {"role": "assistant", "content": "hi"}]
    assert openai_map_fn({"messages": messages}) == one_round("Say hi.", "hi")


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "..."}], r"messages\[1\] has role 'narrator'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
     "content part of type 'image_url'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "loss": "maybe"}],
     r"messages\[1\] has loss='maybe'"),
    ([{"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "weather"}}]}],
     r"messages\[1\] is an assistant message with tool calls"),
    ([{"content": "hi"}], r"messages\[0\] has no 'from' \(or 'role'\) field"),
    ([{"role": "user", "text": "hi"}], r"messages\[0\] has no 'value' \(or 'content'\) field"),
    (["hi"], r"messages\[0\] is a str, not a message dict"),
])
def test_openai_malformed_messages(messages, message):
    with pytest.raises(ConfigError, match=message):
        openai_map_fn({"messages": messages})


def test_openai_missing_messages():
    with pytest.raises(ConfigError, match="no 'messages' field, which openai_map_fn needs"):
        openai_map_fn({"conversations": [{"from": "human", "value": "hi"}]})
    with pytest.raises(ConfigError, match="field 'messages' is a int, not a list of messages"):
        openai_map_fn({"messages": 3})


# --------------------------------------------------------------------------------------------
# ShareGPT and WizardLM
# --------------------------------------------------------------------------------------------

def test_sharegpt_from_value_multi_turn():
    row = {"id": "a1", "conversations": [
        {"from": "system", "value": "You are a pirate."},
        {"from": "human", "value": "Hello!"},
        {"from": "gpt", "value": "Ahoy!"},
        {"from": "human", "value": "Where is the treasure?"},
        {"from": "gpt", "value": "Buried on the island."},
    ]}
    expected = {"conversation": [
        {"system": "You are a pirate.", "input": "Hello!", "output": "Ahoy!"},
        {"input": "Where is the treasure?", "output": "Buried on the island."},
    ]}
    assert sharegpt_map_fn(row) == expected
    # the same list as a JSON string, as some datasets store it
    assert sharegpt_map_fn({"conversations": json.dumps(row["conversations"])}) == expected


def test_sharegpt_role_content_with_tools_under_messages():
    row = {"messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
        {"role": "user", "content": "Thanks!"},  # unanswered: dropped
    ]}
    assert sharegpt_map_fn(row) == {"conversation": [
        {"system": "You can look up the weather.", "input": "Weather in Paris?",
         "output": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"input": '{"temp_c": 18}', "output": "It is 18 °C in Paris."},
    ]}


def test_sharegpt_other_role_names_and_weights():
    row = {"conversations": [
        {"from": "user", "value": "Search for cats."},
        {"from": "function_call", "value": "ignored"},
    ]}
    with pytest.raises(ConfigError, match="role 'function_call'.*known roles: assistant, bot, chatgpt, function, "
                                          "gpt, human, ipython, model, observation, system, tool, user"):
        sharegpt_map_fn(row)
    row = {"conversations": [
        {"from": "User", "value": "Search for cats."},
        {"from": "bot", "value": "search('cats')", "weight": 0},
        {"from": "observation", "value": "3 results"},
        {"from": "user", "value": "Summarise them."},
        {"from": "model", "value": "Three pages about cats.", "weight": 1.0},
        {"from": "function", "value": {"status": "ok"}},
        {"from": "assistant", "value": "Done."},
        {"from": "human", "value": "   "},
    ]}
    assert sharegpt_map_fn(row) == {"conversation": [
        {"input": "Search for cats.", "output": "search('cats')", "output_with_loss": False},
        # the tool result is folded into the next input, before the user's text
        {"input": "3 results\nSummarise them.", "output": "Three pages about cats."},
        {"input": '{"status": "ok"}', "output": "Done."},
    ]}


def test_sharegpt_arrow_style_rows():
    # datasets gives every message every key seen in the column, missing ones as None
    row = {"conversations": [
        {"from": "human", "value": "Hi", "loss": None},
        {"from": "gpt", "value": "Hello", "loss": None},
        {"from": "human", "value": "Bye", "loss": None},
        {"from": "gpt", "value": None, "loss": False},
    ], "messages": None}
    assert sharegpt_map_fn(row) == {"conversation": [
        {"input": "Hi", "output": "Hello"}, {"input": "Bye", "output": "", "output_with_loss": False}]}


def test_sharegpt_missing_fields():
    with pytest.raises(ConfigError, match="neither 'conversations' nor 'messages' field, which sharegpt_map_fn"):
        sharegpt_map_fn({"text": "hi"})
    with pytest.raises(ConfigError, match="neither 'conversations' nor 'messages'"):
        sharegpt_map_fn({"conversations": None, "messages": None})
    with pytest.raises(ConfigError, match="'conversations' is a string that is neither JSON nor a Python literal"):
        sharegpt_map_fn({"conversations": "human: hi"})
    with pytest.raises(ConfigError, match=r"conversations\[1\] has no 'from' \(or 'role'\) field"):
        sharegpt_map_fn({"conversations": [{"from": "human", "value": "hi"}, {"speaker": "gpt", "value": "yo"}]})


def test_wizardlm():
    row = {"idx": "alpaca_1", "conversations": [
        {"from": "human", "value": "Rewrite this sentence more formally: gonna be late."},
        {"from": "gpt", "value": "I am going to be late."},
        {"from": "human", "value": "Shorter?"},
        {"from": "gpt", "value": "I'll be late."},
        {"from": "human", "value": "Thanks"},
    ]}
    assert wizardlm_map_fn(row) == {"conversation": [
        {"input": "Rewrite this sentence more formally: gonna be late.", "output": "I am going to be late."},
        {"input": "Shorter?", "output": "I'll be late."},
    ]}
    assert wizardlm_map_fn({"conversations": [{"from": "gpt", "value": "Hi"}]}) == DROPPED
    with pytest.raises(ConfigError, match="no 'conversations' field, which wizardlm_map_fn needs"):
        wizardlm_map_fn({"messages": row["conversations"]})


# --------------------------------------------------------------------------------------------
# MSAgent-Bench (ReAct)
# --------------------------------------------------------------------------------------------

IE_SCHEMA = {"name": "modelscope_text-ie", "description": "信息抽取服务", "url": "http://host/ie",
             "paths": [{"name": "modelscope_text-ie", "method": "post", "description": "信息抽取服务",
                        "parameters": [{"name": "text", "description": "用户输入的文本", "required": "True"},
                                       {"name": "schema", "description": "要抽取信息的json表示", "required": "True"}]}]}
ADDRESS_SCHEMA = {"name": "modelscope_text-address", "description": "地址解析服务", "url": "http://host/addr",
                  "paths": [{"name": "modelscope_text-address", "parameters": []}]}
MSAGENT_SYSTEM = (
    "你是达摩院的ModelScopeGPT。当前对话可以使用的插件信息如下，请自行判断是否需要调用插件。\n\n"
    f"1. {json.dumps({'plugin_name': 'modelscope_text-ie', 'plugin_schema_for_model': IE_SCHEMA}, ensure_ascii=False)}"
    f"\n\n2. {json.dumps({'plugin_name': 'modelscope_text-address', 'plugin_schema_for_model': ADDRESS_SCHEMA})}"
)
EXPECTED_SYSTEM = REACT_SYSTEM.format(
    tools=('- modelscope_text-ie: 信息抽取服务 Parameters: {"text": "用户输入的文本", '
           '"schema": "要抽取信息的json表示"}\n'
           "- modelscope_text-address: 地址解析服务"),
    names="modelscope_text-ie, modelscope_text-address",
)


def think(api_name: str, parameters: dict) -> str:
    call = json.dumps({"api_name": api_name, "url": "http://host/x", "parameters": parameters}, ensure_ascii=False)
    return f"<|startofthink|>```JSON\n{call}\n```<|endofthink|>"


def exec_(result: dict) -> str:
    return f"<|startofexec|>```JSON\n{json.dumps(result, ensure_ascii=False)}\n```<|endofexec|>"


def test_msagent_react_call_result_and_answer():
    assistant = (think("modelscope_text-ie", {"text": "美国政府宣布加征关税。", "schema": '{"地理位置": null}'})
                 + "\n\n" + exec_({"地理位置": ["美国"]}) + "\n信息抽取结果：美国。")
    conversations = [
        {"from": "system", "value": MSAGENT_SYSTEM},
        {"from": "user", "value": "抽取地理位置：美国政府宣布加征关税。"},
        {"from": "assistant", "value": assistant},
        {"from": "user", "value": "谢谢，你是谁？"},
        {"from": "assistant", "value": "我是ModelScopeGPT。"},
    ]
    expected = {"conversation": [
        {"system": EXPECTED_SYSTEM, "input": "抽取地理位置：美国政府宣布加征关税。",
         "output": 'Action: modelscope_text-ie\n'
                   'Action Input: {"text": "美国政府宣布加征关税。", "schema": "{\\"地理位置\\": null}"}'},
        {"input": 'Response: {"地理位置": ["美国"]}', "output": "Final Answer: 信息抽取结果：美国。"},
        {"input": "谢谢，你是谁？", "output": "Final Answer: 我是ModelScopeGPT。"},
    ]}
    assert msagent_react_map_fn({"id": "MS_Agent_Bench_1", "conversations": conversations}) == expected
    # MSAgent-Bench's files store the list as a Python literal string
    assert msagent_react_map_fn({"conversations": repr(conversations)}) == expected


def test_msagent_react_thoughts_chained_calls_and_a_pending_result():
    assistant = ("我先解析地址。" + think("modelscope_text-address", {"text": "杭州市西湖区"})
                 + exec_({"city": "杭州"}) + "再抽取信息。" + think("modelscope_text-ie", {"text": "杭州"})
                 + exec_({"地理位置": ["杭州"]}))
    conversations = [
        {"from": "user", "value": "分析：杭州市西湖区"},
        {"from": "assistant", "value": assistant},
        {"from": "user", "value": "总结一下。"},
        {"from": "assistant", "value": "地点是杭州。"},
    ]
    assert msagent_react_map_fn({"conversations": conversations}) == {"conversation": [
        {"input": "分析：杭州市西湖区",
         "output": 'Thought: 我先解析地址。\nAction: modelscope_text-address\nAction Input: {"text": "杭州市西湖区"}'},
        {"input": 'Response: {"city": "杭州"}',
         "output": 'Thought: 再抽取信息。\nAction: modelscope_text-ie\nAction Input: {"text": "杭州"}'},
        # a result with no answer after it waits for the next user message
        {"input": 'Response: {"地理位置": ["杭州"]}\n总结一下。', "output": "Final Answer: 地点是杭州。"},
    ]}


def test_msagent_react_drops_rows_it_cannot_read():
    bad_call = "<|startofthink|>```JSON\n{api_name: oops}\n```<|endofthink|>"
    assert msagent_react_map_fn({"conversations": [
        {"from": "user", "value": "hi"}, {"from": "assistant", "value": bad_call}]}) == DROPPED
    assert msagent_react_map_fn({"conversations": [{"from": "user", "value": "hi"}]}) == DROPPED
    with pytest.raises(ConfigError, match="no 'conversations' field, which msagent_react_map_fn needs"):
        msagent_react_map_fn({"messages": []})


# --------------------------------------------------------------------------------------------
# The mapping, and every map fn's output through a template
# --------------------------------------------------------------------------------------------

def test_dataset_format_mapping_names_every_map_fn():
    exported = {name for name in map_fns.__all__ if name.endswith("_map_fn") and name != "template_map_fn"}
    assert {fn.__name__ for fn in DATASET_FORMAT_MAPPING.values()} == exported
    for name, fn in DATASET_FORMAT_MAPPING.items():
        assert fn.__name__ == f"{name}_map_fn"
    assert DATASET_FORMAT_MAPPING["crime_kg_assitant"] is crime_kg_assitant_map_fn
    assert DATASET_FORMAT_MAPPING["sharegpt"] is sharegpt_map_fn


def test_map_fn_output_goes_through_a_template():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                        {"role": "assistant", "content": "A1", "loss": False},
                        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    out = template_map_fn_factory("qwen_chat")(openai_map_fn(row))["conversation"]
    assert [turn["input"] for turn in out] == [
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"]
    assert [turn["output"] for turn in out] == ["A1<|im_end|>", "A2<|im_end|>"]
    assert [turn.get("output_with_loss") for turn in out] == [False, None]
