"""How many of XTuner v0.2.0's text-LLM SFT configs load, and run, in lmtune (issue 6).

Scope: every ``.py`` of XTuner's config tree but the llava, internvl, dpo, orpo, reward_model and
deepspeed folders. Of those, the files that set ``framework = "huggingface"`` are scripts for
transformers' ``Trainer`` rather than configs of XTuner's engine; they are counted apart.

* Load share: ``lmtune.config.Config.fromfile(path)`` on each file, in this process; failures are
  grouped by their message.
* Run share (``--run``): each config that loads is pointed at a tiny local model of its
  architecture (transformers' own class, 2 layers, hidden size 64, random weights; made with
  ``tests/tiny_archs.py``, or here for the architectures that file lacks) and at a tiny local
  jsonl in the format its map function reads (MOSS files, InternLM-repo tokenized and chat
  folders likewise), then built with ``Runner.from_config`` and trained for 2 iterations. The
  tiny tokenizer has the BOS/EOS and special tokens of the real model's tokenizer. Everything
  else stays as the config writes it (dtypes, LoRA, 4-bit quantization on the CPU, packing,
  hooks), except what keeps a run small: ``max_length``/``packed_length`` 512,
  ``train_cfg.max_iters`` 2, one short evaluation input with ``max_new_tokens`` 2,
  ``num_workers`` 0 and ``map_num_proc`` None. Checkpoints are saved as the config says (with 2
  iterations: once, at the end). A run counts when ``Runner.train()`` returns after 2 iterations
  with finite losses. A config with ``sequence_parallel_size`` N runs in N processes of one gloo process
  group (forked like the others; ``--sequence-parallel off``: in one, with the size set to 1).
  ModelScope/openMind datasets and model downloads (``model_resource``) are
  replaced like Hugging Face hub ones. A run that fails is tried once more, relaxed (float32
  dtypes, ``sdpa`` for ``flash_attention_2``; in as many processes as before), to tell apart what
  only a GPU or flash-attn stands in the way of.

  Architectures whose hub repositories ship their own code (InternLM, ChatGLM, Baichuan, MiniCPM,
  Qwen v1, DeepSeek-MoE) run through lmtune's ports (``lmtune.model.ports``) on a tiny checkpoint in the
  hub's own layout (``tests/fixtures/ports``, made with the original code); one without a port or a
  fixture is "load only". The architecture is read from the config's
  ``pretrained_model_name_or_path`` (the folder name when that is a placeholder path).

  Each config runs in its own process, forked from a server that has imported torch,
  transformers and lmtune once, one at a time, with a timeout; a hang or crash costs one config.

Usage::

    .venv/bin/python benchmarks/xtuner_configs.py                  # load share only
    .venv/bin/python benchmarks/xtuner_configs.py --run            # and run share
    .venv/bin/python benchmarks/xtuner_configs.py --run --only 'qwen1_5_0_5b' --limit 3
    .venv/bin/python benchmarks/xtuner_configs.py --run --sample   # one config per combination

Options: ``--config-root DIR`` (XTuner's ``configs`` folder), ``--out FILE`` (the Markdown report,
default ``docs/xtuner_configs.md``), ``--json FILE`` (every config's result; ``--report-from FILE``
writes the report of such a file again, without loading or running anything), ``--timeout S`` (per
run), ``--qlora {as-written,off}`` (``off``: 4-bit configs run with ``quantization_config=None``,
except the first of each architecture), ``--work-dir DIR`` (keep the tiny models, data and per-run
logs there instead of in a removed temporary directory).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_ROOT = REPO / "benchmarks/.venv-xtuner/lib/python3.11/site-packages/xtuner/configs"
EXCLUDED_DIRS = {"llava", "internvl", "dpo", "orpo", "reward_model", "deepspeed"}
# --scope preference: these folders, and configs elsewhere that build preference data (minicpm's DPO)
PREFERENCE_DIRS = {"dpo", "orpo", "reward_model"}
PREFERENCE_MARK = "build_preference_dataset"

# 512, not 128: the tiny tokenizers' 384-token vocabulary takes about one token per 1.4 characters, and
# some configs' system prompts (lawyer, medical, the ReAct tool prompt) alone fill 128 tokens.
RUN_MAX_LENGTH = 512
RUN_ITERS = 2
EVAL_INPUT = "Say hello."

# --------------------------------------------------------------------------- architectures

# (pattern, architecture), first match wins; searched in the lower-cased hub id, then in the
# config's path (for placeholder model paths such as "/path/to/your/base/model").
ARCH_RULES = [
    (r"qwen1\.5-moe|qwen2-moe|qwen_moe", "qwen2_moe"),
    (r"qwen1\.5|qwen1_5|qwen2", "qwen2"),
    (r"qwen", "qwen"),
    (r"mixtral", "mixtral"),
    (r"mistral|zephyr", "mistral"),
    (r"gemma", "gemma"),
    (r"phi-3|phi3", "phi3"),
    (r"starcoder2", "starcoder2"),
    (r"starcoder", "gpt_bigcode"),  # bigcode/starcoder is a GPTBigCode model
    (r"c4ai-command|cohere", "cohere"),
    (r"deepseek-v2|deepseek_v2", "deepseek_v2"),
    (r"deepseek-moe|deepseek_moe", "deepseek"),
    (r"deepseek-coder|deepseek_coder", "llama"),
    (r"llama|vicuna|(^|/)yi[-_]", "llama"),
    (r"internlm3", "internlm3"),
    (r"internlm2|polar", "internlm2"),  # POLAR reward models are InternLM2
    (r"internlm", "internlm"),
    (r"chatglm", "chatglm"),
    (r"baichuan", "baichuan"),
    (r"minicpm3", "minicpm3"),
    (r"minicpm", "minicpm"),
]

# Architectures whose modelling code transformers ships: a tiny model of them can be made and run.
NATIVE = {"llama", "qwen2", "qwen2_moe", "mistral", "mixtral", "gemma", "phi3", "gpt_bigcode", "starcoder2",
          "cohere", "deepseek_v2"}
# Architectures whose hub repositories ship their own (transformers 4) code. Those lmtune ports
# (lmtune.model.ports) run through the port, on a tiny hub-layout checkpoint; the others are load only.
HUB_CODE = {"qwen", "deepseek", "internlm", "internlm2", "internlm3", "chatglm", "baichuan", "minicpm", "minicpm3"}
PORT_FIXTURES = REPO / "tests" / "fixtures" / "ports"


# the port fixture a hub-code architecture's configs run on (by hub id where the variants differ)
PORT_FIXTURE = {"internlm2": "internlm2", "internlm3": "internlm3", "internlm": "internlm", "chatglm": "chatglm3",
                "qwen": "qwen", "deepseek": "deepseek_moe", "minicpm": "minicpm", "minicpm3": "minicpm3"}


def ported_fixture(arch: str, hub_id: str | None = None) -> str | None:
    """The fixture (tests/fixtures/ports, made from the original code) whose tiny hub-layout checkpoint runs
    ``arch``'s configs, or None when lmtune has no port of ``arch``."""
    if arch == "baichuan":
        hub = (hub_id or "").lower()
        name = ("baichuan2_13b" if "13b" in hub else "baichuan2_7b") if "baichuan2" in hub or "13b" in hub \
            else "baichuan_7b"
    else:
        name = PORT_FIXTURE.get(arch)
    return name if name and (PORT_FIXTURES / name / "reference.safetensors").is_file() else None


REMOTE = {arch for arch in HUB_CODE if ported_fixture(arch) is None}

# The tokenizer a tiny model gets: the style (BOS, EOS, special tokens) of the real model's tokenizer,
# by hub id; first match wins. Names are tests/tiny_archs.py's TOKENIZER_STYLES, plus EXTRA_STYLES.
TOKENIZER_RULES = [
    (r"internlm2|internlm2_5", "internlm2_chat"),
    (r"internlm3", "internlm3_chat"),
    (r"chatglm", "chatglm3"),
    (r"baichuan", "baichuan2_chat"),
    (r"minicpm3", "minicpm3"),
    (r"minicpm", "minicpm"),
    (r"llama-3|llama3", "llama3_chat"),
    (r"deepseek-coder", "deepseek_coder"),
    (r"deepseek-v2", "deepseek_v2"),
    (r"(^|/)yi[-_]", "yi"),
    (r"qwen", "qwen2_chat"),
    (r"mixtral", "mixtral"),
    (r"mistral|zephyr", "mistral"),
    (r"gemma", "gemma"),
    (r"phi-3", "phi3_chat"),
    (r"starcoder", "starcoder"),
    (r"c4ai-command|cohere", "cohere"),
    (r"", "llama2_chat"),  # Llama 1/2, vicuna...: <s> ... </s>
]
EXTRA_STYLES = {
    "yi": dict(bos="<|startoftext|>", eos="<|endoftext|>", markers=["<|im_start|>", "<|im_end|>"]),
    "starcoder": dict(bos=None, eos="<|endoftext|>", markers=[]),
    "cohere": dict(bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>",
                   markers=["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                            "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]),
}


def architecture(hub_id: str | None, rel_path: str) -> str:
    for text in ((hub_id or "").lower(), rel_path.lower()):
        for pattern, arch in ARCH_RULES:
            if text and re.search(pattern, text):
                return arch
    return "unknown"


def tokenizer_style(hub_id: str | None, arch: str) -> str:
    text = (hub_id or arch).lower()
    return next(style for pattern, style in TOKENIZER_RULES if re.search(pattern, text))


# --------------------------------------------------------------------------- tiny data

ALPACA = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello, how are you?"},
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello!"},
]
SHAREGPT = [{"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "The capital of France is Paris."},
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello, how are you?"}]
MSAGENT_TOOL = {"name": "weather", "description": "the weather of a city",
                "paths": [{"name": "weather", "parameters": [{"name": "city", "description": "the city"}]}]}
MSAGENT_CALL = json.dumps({"api_name": "weather", "parameters": {"city": "Paris"}})
MSAGENT = [
    {"from": "system", "value": "You can use these tools.\n1. " + json.dumps({"plugin_name": "weather",
                                                                             "plugin_schema_for_model": MSAGENT_TOOL})},
    {"from": "user", "value": "What is the weather in Paris?"},
    {"from": "assistant", "value": f"<|startofthink|>```JSON\n{MSAGENT_CALL}\n```<|endofthink|>\n\n"
                                   "<|startofexec|>```JSON\n{\"weather\": \"sunny\"}\n```<|endofexec|>\nIt is sunny."},
]
MOSS = {"meta_instruction": "You are MOSS, a helpful assistant.\n", "num_turns": 2,
        "chat": {"turn_1": {"Human": "<|Human|>: Hello, how are you?<eoh>\n", "MOSS": "<|MOSS|>: I am fine.<eom>\n"},
                 "turn_2": {"Human": "<|Human|>: What is the capital of France?<eoh>\n",
                            "Inner Thoughts": "<|Inner Thoughts|>: I know this<eot>\n",
                            "Commands": "<|Commands|>: None<eoc>\n",
                            "Tool Responses": "<|Results|>: None<eor>\n",
                            "MOSS": "<|MOSS|>: The capital of France is Paris.<eom>\n"}}}

# map function (without "_map_fn"), or a source kind -> rows of that format
ROWS: dict[str, list[dict]] = {
    "alpaca": ALPACA,
    "alpaca_zh": [{"instruction_zh": "请给我介绍五个上海的景点", "input_zh": "", "output_zh": "外滩，豫园，东方明珠。"},
                  {"instruction_zh": "法国的首都是哪里？", "input_zh": "", "output_zh": "巴黎。"}],
    "medical": ALPACA,
    "oasst1": [{"text": "### Human: What is the capital of France?### Assistant: The capital of France is Paris."},
               {"text": "### Human: Say hello.### Assistant: Hello!### Human: Again.### Assistant: HELLO!"}],
    "openai": [{"messages": CHAT}, {"messages": CHAT[1:3]}],
    "code_alpaca": [{"prompt": "Write a python function that adds two numbers.",
                     "completion": "def add(a, b):\n    return a + b"}],
    "tiny_codes": [{"prompt": "Write a python function that adds two numbers.",
                    "response": "def add(a, b):\n    return a + b"}],
    "sql": [{"context": "CREATE TABLE city (name VARCHAR, country VARCHAR)",
             "question": "Which city is the capital of France?", "answer": "SELECT name FROM city"}],
    "colors": [{"description": "Sky blue: a light blue like the sky at noon", "color": "#87CEEB"}],
    "arxiv": [{"abstract": "We fine-tune tiny models on tiny data and report that it works.",
               "title": "Tiny models,\n  tiny data"}],
    "openorca": [{"system_prompt": "You are a helpful assistant.", "question": "What is the capital of France?",
                  "response": "Paris."}],
    "crime_kg_assitant": [{"input": "What is theft?", "output": "Taking what belongs to someone else."}],
    "law_reference": [{"question": "What is theft?", "answer": "Taking what belongs to someone else."}],
    "msagent_react": [{"conversations": MSAGENT}],
    "pretrain": [{"text": "The quick brown fox jumps over the lazy dog. " * 4}],
    "wizardlm": [{"conversations": SHAREGPT}],
    "sharegpt": [{"conversations": SHAREGPT}],
    "stack_exchange": [{"question": "How do I add two numbers in python?", "response": "Use a + b."}],
    "default": [{"input": "What is the capital of France?", "output": "Paris."}],
    # an MMLU evaluation row as qlora's five_shot_mmlu_val.json holds it: the prompt, the answer letter, the subject
    "mmlu": [{"input": "Which is a planet?\nA. Sun\nB. Mars\nC. Moon\nD. Io\nAnswer:", "output": "B",
              "subject": "astronomy"}],
    # dataset_map_fn=None: rows already in XTuner's conversation format
    "conversation": [{"conversation": [{"system": "Be brief.", "input": "What is the capital of France?",
                                        "output": "Paris."}, {"input": "Say hello.", "output": "Hello!"}]}],
    # do_dataset_tokenization=False: rows of token ids (filled in with the tiny vocabulary's ids)
    "tokenized": [{"input_ids": list(range(3, 3 + 60)), "labels": list(range(3, 3 + 60))}],
    "moss": [MOSS],
}
# preference pairs: orpo-dpo-mix-40k / ultrafeedback (whole conversations), Intel orca pairs, and rows that are
# pairs already (dataset_map_fn=None); POLAR's rows add a reference answer
MIX = [{"chosen": CHAT[1:3], "rejected": [CHAT[1], {"role": "assistant", "content": "London, I think."}]},
       {"chosen": CHAT[1:], "rejected": CHAT[1:4] + [{"role": "assistant", "content": "No."}]}]
ROWS.update({
    "orpo_dpo_mix_40k": MIX,
    "intel_orca_dpo": [{"system": "Be brief.", "question": "What is the capital of France?", "chosen": "Paris.",
                        "rejected": "London."}],
    "preference": [{"prompt": CHAT[:2], "chosen": [CHAT[2]], "rejected": [{"role": "assistant", "content": "Rome."}]}],
    "polar": [{"prompt": CHAT[1:2], "reference": [CHAT[2]], "chosen": [CHAT[2]],
               "rejected": [{"role": "assistant", "content": "Rome."}]}],
})
REWARD_TOKEN = 5  # an id every tiny vocabulary has
# XTuner's preference data renders pairs with the tokenizer's chat template, which the real models' tokenizers
# have and the tiny ones may lack: the family's template (its markers as text where the tiny vocabulary lacks them)
CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TEMPLATES = {
    "llama": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
              " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "minicpm": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<用户>' + m['content'] }}"
                "{% elif m['role'] == 'assistant' %}{{ '<AI>' + m['content'] + eos_token }}{% else %}{{ m['content'] }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"),
}


def chat_template_for(arch: str, model_dir: Path) -> str | None:
    """The chat template to give a tiny tokenizer that has none (None: it has one)."""
    settings = model_dir / "tokenizer_config.json"  # read, not loaded: a hub-code tokenizer runs through lmtune
    if (model_dir / "chat_template.jinja").is_file() or (
            settings.is_file() and json.loads(settings.read_text(encoding="utf-8")).get("chat_template")):
        return None
    return CHAT_TEMPLATES.get(arch.removesuffix("3"), CHATML)
ROW_REPEAT = 8  # each file holds its rows this many times: enough for 2 iterations with packing


def write_data(data_dir: Path) -> dict[str, str]:
    """One jsonl per format under ``data_dir`` (plus InternLM-repo folders); format -> path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, rows in ROWS.items():
        path = data_dir / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * ROW_REPEAT),
                        encoding="utf-8")
        paths[fmt] = str(path)
    # InternLM-repo tokenized files: {"tokens": [...]} a line, negative ids are not trained
    bins = data_dir / "intern_repo_tokenized"
    bins.mkdir(exist_ok=True)
    with open(bins / "part0.bin", "w", encoding="utf-8") as f:
        for i in range(40):  # 2400 tokens: 4 packed rows of RUN_MAX_LENGTH
            f.write(json.dumps({"tokens": [-(3 + i)] * 10 + list(range(3 + i, 53 + i))}) + "\n")
    paths["intern_repo_tokenized"] = str(bins)
    # InternLM-repo untokenized chat files: one JSON list of OpenAI messages a line
    chats = data_dir / "intern_repo_untokenized"
    chats.mkdir(exist_ok=True)
    (chats / "part0.json").write_text("".join(json.dumps(CHAT) + "\n" for _ in range(8 * ROW_REPEAT)),
                                      encoding="utf-8")  # packed into fixed rows: enough tokens for several
    paths["intern_repo_untokenized"] = str(chats)
    return paths


def corpus() -> list[str]:
    """Texts the tiny tokenizers are trained on, so the data encodes in few tokens."""
    return [json.dumps(r, ensure_ascii=False) for rows in ROWS.values() for r in rows]


# --------------------------------------------------------------------------- tiny models

def _extra_arch_config(arch: str, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int):
    """transformers configs of the architectures tests/tiny_archs.py lacks, at the same tiny size."""
    import transformers as tf

    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, **ids)
    if arch == "cohere":
        return tf.CohereConfig(**common)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64)
    if arch == "starcoder2":
        return tf.Starcoder2Config(**common, sliding_window=None)
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(vocab_size=vocab_size, n_embd=64, n_inner=128, n_layer=2, n_head=4,
                                   n_positions=512, multi_query=True, **ids)
    raise KeyError(f"no tiny model recipe for {arch}")


def tiny_model(models_dir: Path, arch: str, style: str, fixture: str | None = None) -> Path:
    """A tiny ``arch`` model with a ``style`` tokenizer, made on first use and kept in ``models_dir``; for a
    ported hub-code architecture, the hub-layout repository of its port ``fixture`` (the tests' builder, whose
    tokenizer is in the family's style)."""
    sys.path.insert(0, str(REPO / "tests"))
    if fixture is not None:
        root = models_dir / f"port-{fixture}"
        done = root / "path.txt"
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            from hub_models import hub_dir_for

            built = hub_dir_for(root, fixture)
            done.write_text(str(built))
        return Path(done.read_text())
    target = models_dir / f"{arch}-{style}"
    if (target / "config.json").is_file():
        return target
    import tiny_archs

    for name, extra in EXTRA_STYLES.items():  # styles tiny_archs does not know, used by name below
        tiny_archs.TOKENIZER_STYLES.setdefault(name, extra)
    partial = models_dir / f".{arch}-{style}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if arch in tiny_archs.NATIVE_ARCHS:
        tiny_archs.make_tiny_model(partial, arch, style, corpus())
    else:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = tiny_archs.make_tokenizer(style, corpus())
        config = _extra_arch_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                    tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


# --------------------------------------------------------------------------- configs

def discover(root: Path, scope: str = "sft") -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.name == "__init__.py" or "__pycache__" in rel.parts:
            continue
        if scope == "preference":
            if rel.parts[0] in PREFERENCE_DIRS or (rel.parts[0] not in EXCLUDED_DIRS
                                                   and PREFERENCE_MARK in path.read_text(encoding="utf-8")):
                files.append(path)
        elif rel.parts[0] not in EXCLUDED_DIRS:
            files.append(path)
    return files


def type_name(node) -> str | None:
    """The name of what a ``dict(type=...)`` builds (``'process_hf_dataset'``), else None."""
    if not isinstance(node, dict) or "type" not in node:
        return None
    ref = node["type"]
    return getattr(ref, "__name__", None) or str(ref).rstrip(">").split(".")[-1].split(" ")[0]


def walk(node, visit, seen: set | None = None) -> None:
    """Call ``visit`` on every dict under ``node`` (each shared dict once)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    if isinstance(node, dict):
        seen.add(id(node))
        visit(node)
        for value in list(node.values()):
            walk(value, visit, seen)
    elif isinstance(node, (list, tuple)):
        seen.add(id(node))
        for value in node:
            walk(value, visit, seen)


DATASET_BUILDERS = ("process_hf_dataset", "process_ms_dataset", "MOSSSFTDataset",
                    "load_intern_repo_tokenized_dataset", "load_intern_repo_untokenized_dataset",
                    "build_preference_dataset")


def data_format(node: dict) -> str:
    """The tiny-data format a dataset-building dict needs."""
    kind = type_name(node)
    if kind == "MOSSSFTDataset":
        return "moss"
    if kind.startswith("load_intern_repo_"):
        return kind.removeprefix("load_").removesuffix("_dataset")
    fn = node.get("dataset_map_fn")
    if node.get("input_ids_with_output") is False:  # an evaluation set of prompts: MMLU's multiple choice
        return "mmlu"
    if fn is None and kind == "build_preference_dataset":
        return "polar" if node.get("is_reference") else "preference"  # rows of prompt / chosen / rejected
    if fn is None:
        return "conversation" if node.get("do_dataset_tokenization", True) else "tokenized"
    name = fn if isinstance(fn, str) else (type_name(fn) if isinstance(fn, dict) else getattr(fn, "__name__", str(fn)))
    return name.removesuffix("_map_fn")


def describe(cfg, rel: str) -> dict:
    """What a loaded config is: model, architecture, method, data formats, template, hub needs."""
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    info: dict = {"framework": cfg.get("framework", "mmengine")}
    hub_ids = []
    walk(cfg.get("model"), lambda d: hub_ids.append(d["pretrained_model_name_or_path"])
         if isinstance(d.get("pretrained_model_name_or_path"), str) else None)
    hub_id = hub_ids[0] if hub_ids else cfg.get("pretrained_model_name_or_path")
    info["hub_id"] = hub_id
    info["arch"] = architecture(hub_id, rel)
    llm = (cfg.get("model") or {}).get("llm") or {}
    llm = llm if isinstance(llm, dict) else {}
    quant = llm.get("quantization_config") if isinstance(llm.get("quantization_config"), dict) else {}
    if quant.get("load_in_4bit") or llm.get("load_in_4bit"):
        info["method"] = "qlora"
    elif quant.get("load_in_8bit") or llm.get("load_in_8bit"):
        info["method"] = "int8-lora"
    elif (cfg.get("model") or {}).get("lora") is not None:
        info["method"] = "lora"
    else:
        info["method"] = "full"
    formats, hubs = [], []

    def visit(d):
        kind = type_name(d)
        if kind in DATASET_BUILDERS:
            formats.append(data_format(d))
            source = str(d.get("dataset", {}).get("type", "")) if isinstance(d.get("dataset"), dict) else ""
            if kind == "process_ms_dataset" or "modelscope" in source:
                hubs.append("ModelScope")
            elif "openmind" in source.lower():
                hubs.append("openMind")

    walk(cfg.get("train_dataloader"), visit)
    resource = cfg.get("model_resource")
    if isinstance(resource, dict):
        fn = resource.get("fn")
        where = f"{getattr(fn, '__module__', '')} {fn!r}".lower()  # a stand-in's repr names its package
        hubs.append("openMind" if "openmind" in where else "ModelScope" if "modelscope" in where else "other")
    info["data"] = "+".join(dict.fromkeys(formats)) or "?"
    info["hub"] = "+".join(dict.fromkeys(hubs))
    template = cfg.get("prompt_template")
    info["template"] = next((name for name, t in PROMPT_TEMPLATE.items() if t == template), None) \
        if template is not None else None
    info["sequence_parallel"] = cfg.get("sequence_parallel_size", 1) or 1
    return info


def short_error(exc: BaseException, root: Path | None = None) -> str:
    """One line for grouping: the exception type and message, paths shortened."""
    text = f"{type(exc).__name__}: {exc}"
    if root is not None:
        text = text.replace(str(root) + "/", "")
    text = re.sub(r"/tmp/\S+?/(\w+\.py)", r"\1", text)
    text = re.sub(r"(/\S+)?/xtuner_cfg_run\S*", "<tmp>", text)
    return " ".join(text.split())[:400]


def group_key(message: str) -> str:
    """Messages that differ only in the config file, line numbers or tmp paths group together."""
    text = re.sub(r"\S+\.py(:\d+)?: ", "<config>: ", message)
    text = re.sub(r"/\S*/(models|data|work)/\S*", r"<\1>", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text[:300]


def load_all(files: list[Path], root: Path) -> list[dict]:
    from lmtune.config import Config

    results = []
    for path in files:
        rel = str(path.relative_to(root))
        entry = {"config": rel, "family": rel.split("/")[0]}
        start = time.perf_counter()
        try:
            cfg = Config.fromfile(path)
        except Exception as exc:  # noqa: BLE001 - measured, not handled
            hub_id = _hub_id_of(path)
            entry.update(loaded=False, load_error=short_error(exc, root), hub_id=hub_id, arch=architecture(hub_id, rel))
        else:
            entry.update(loaded=True, **describe(cfg, rel))
        entry["load_s"] = round(time.perf_counter() - start, 3)
        results.append(entry)
    return results


def _hub_id_of(path: Path) -> str | None:
    """The model a config that did not load names, read from its text."""
    match = re.search(r"^pretrained_model_name_or_path\s*=\s*['\"]([^'\"]+)", path.read_text(encoding="utf-8"), re.M)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- one run (in a child process)

def shrink(cfg, model_dir: str, data: dict[str, str], quantize: bool, relaxed: bool = False,
           chat_template: str | None = None) -> None:
    """Point a loaded config at the tiny model and data, and make the run 2 short iterations.

    ``quantize=False`` drops a 4-bit ``quantization_config``. ``relaxed=True`` (the retry of a failed
    run, to see what else stands in its way) loads, computes and trains in float32 whatever dtypes
    the config names, replaces ``attn_implementation="flash_attention_2"`` (flash-attn needs a GPU)
    by ``"sdpa"``."""
    import torch
    from datasets import load_dataset

    def model_and_data(d: dict) -> None:
        if isinstance(d.get("pretrained_model_name_or_path"), str):
            d["pretrained_model_name_or_path"] = model_dir
            if chat_template and "Tokenizer" in str(getattr(d.get("type"), "__qualname__", d.get("type"))):
                d["chat_template"] = chat_template
        kind = type_name(d)
        if kind in ("process_hf_dataset", "process_ms_dataset", "build_preference_dataset"):
            files = data[data_format(d)]
            split = d.get("split") or "train"  # an evaluation set reads its own split ('val' of MMLU's files)
            d["dataset"] = dict(type=load_dataset, path="json",
                                data_files=files if split == "train" else {split: files})
            for key in ("map_num_proc", "num_proc"):
                if d.get(key):
                    d[key] = None
        if isinstance(d.get("reward_token_id"), int) and d["reward_token_id"] >= 0:
            d["reward_token_id"] = REWARD_TOKEN  # the real model's unused token is past the tiny vocabulary
        elif kind == "MOSSSFTDataset":
            d["data_file"] = data["moss"]
        elif kind and kind.startswith("load_intern_repo_"):
            d["folder"] = data[data_format(d)]
            d["data_order_path"] = None
            if "processed_dataset_dict_path" in d:
                d["processed_dataset_dict_path"] = None
        if kind == "EvaluateChatHook":
            d["evaluation_inputs"] = [EVAL_INPUT]
            d["max_new_tokens"] = 2
        if relaxed:
            for key in ("torch_dtype", "bnb_4bit_compute_dtype"):
                if key in d:
                    d[key] = torch.float32
            if d.get("attn_implementation") == "flash_attention_2":
                d["attn_implementation"] = "sdpa"

    walk(cfg, model_and_data)

    def lengths(d: dict) -> None:
        for key in ("max_length", "packed_length", "max_packed_length"):
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                d[key] = RUN_MAX_LENGTH * (2 if key == "max_packed_length" else 1)

    walk(cfg.get("train_dataloader"), lengths)
    cfg["pretrained_model_name_or_path"] = model_dir
    if isinstance(cfg.get("reward_token_id"), int) and cfg["reward_token_id"] >= 0:
        cfg["reward_token_id"] = REWARD_TOKEN
    cfg.pop("model_resource", None)  # a hub download of the model the tiny one stands for
    cfg["train_cfg"]["max_iters"] = RUN_ITERS
    cfg["train_cfg"]["max_epochs"] = None
    cfg["train_dataloader"]["num_workers"] = 0
    if not quantize and isinstance(cfg.get("model", {}).get("llm"), dict):
        cfg["model"]["llm"]["quantization_config"] = None
    if relaxed and isinstance(cfg.get("optim_wrapper"), dict):
        cfg["optim_wrapper"]["dtype"] = "float32"


def run_one(job: dict) -> dict:
    """Build and train one config on the tiny model; returns its outcome."""
    import torch

    from lmtune.config import Config
    from lmtune.engine.runner import Runner

    torch.set_num_threads(job["threads"])
    result: dict = {}
    start = time.perf_counter()
    stage = "tiny model"
    try:
        model_dir = tiny_model(Path(job["models_dir"]), job["arch"], job["style"], job.get("fixture"))
        stage = "load"
        cfg = Config.fromfile(job["path"])
        template = chat_template_for(job["arch"], model_dir) if PREFERENCE_MARK in Path(job["path"]).read_text(
            encoding="utf-8") else None
        shrink(cfg, str(model_dir), job["data"], job["quantize"], job.get("relaxed", False), template)
        if job.get("world", 1) == 1 and cfg.get("sequence_parallel_size", 1) not in (None, 1):
            cfg["sequence_parallel_size"] = 1  # --sequence-parallel off
        stage = "build"
        runner = Runner.from_config(cfg, work_dir=job["work_dir"], seed=1)
        stage = "train"
        runner.train()
        scalars = runner.log_dir / "scalars.jsonl"
        rows = [json.loads(line) for line in scalars.read_text().splitlines()] if scalars.is_file() else []
        losses = [row.get("loss") for row in rows if "lr" in row]  # training rows (evaluations have rows too)
        result["losses"] = losses
        result["evaluations"] = [row for row in rows if "lr" not in row]
        if runner.iter != RUN_ITERS:
            raise RuntimeError(f"the run stopped after {runner.iter} of {RUN_ITERS} iterations")
        if not losses or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
            raise RuntimeError(f"non-finite or missing losses: {losses}")
        result["status"] = "ran"
    except BaseException as exc:  # noqa: BLE001 - measured: every failure is a result
        result.update(status="failed", stage=stage, error=short_error(exc),
                      where=_lmtune_frame(exc), traceback=traceback.format_exc()[-4000:])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _lmtune_frame(exc: BaseException) -> str:
    """The innermost lmtune frame of the traceback (file:line function), where lmtune's part ended."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/lmtune/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split('/lmtune/', 1)[1]}:{f.lineno} {f.name}"


def _child(job: dict, result_path: str, log_path: str) -> None:
    """Entry point of the per-config process: output to the log file, the outcome to a JSON file."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        result = run_one(job)
        print(result.pop("traceback", ""), flush=True)
    Path(result_path).write_text(json.dumps(result))


def _rank_child(job: dict, rank: int, world: int, port: int, result_path: str, log_path: str) -> None:
    """One rank of a multi-process run (a config's ``sequence_parallel_size``): torchrun's environment, lmtune's
    process group, then the run; rank 0 reports."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from lmtune.engine.strategies import launch

    launch.init_distributed("none")
    try:
        if rank == 0:  # the tiny model, made once before the other ranks read it
            tiny_model(Path(job["models_dir"]), job["arch"], job["style"], job.get("fixture"))
    finally:
        torch.distributed.barrier()
    job = {**job, "threads": max(1, job["threads"] // world)}
    _child(job, result_path if rank == 0 else f"{result_path}.rank{rank}",
           log_path if rank == 0 else f"{log_path}.rank{rank}")
    launch.destroy_distributed(finished=True)


def run_in_child(ctx, job: dict, timeout: float, scratch: Path) -> dict:
    """The run of one config in a process of its own, or in ``job["world"]`` processes of one process group."""
    from lmtune.engine.strategies.launch import free_port

    result_path, log_path = scratch / "result.json", Path(job["log"])
    result_path.unlink(missing_ok=True)
    world = job.get("world", 1)
    if world > 1:
        port = free_port()
        procs = [ctx.Process(target=_rank_child, args=(job, rank, world, port, str(result_path), str(log_path)))
                 for rank in range(world)]
    else:
        procs = [ctx.Process(target=_child, args=(job, str(result_path), str(log_path)))]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(max(0.0, timeout - (time.perf_counter() - start)))
    if any(proc.is_alive() for proc in procs):
        for proc in procs:
            proc.kill()
            proc.join()
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s",
                "seconds": round(time.perf_counter() - start, 2)}
    if not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-300:] if log_path.is_file() else ""
        return {"status": "crashed", "error": f"process exited with code {procs[0].exitcode}: {' '.join(tail.split())}",
                "seconds": round(time.perf_counter() - start, 2)}
    return json.loads(result_path.read_text())


# --------------------------------------------------------------------------- the run share

def run_class(entry: dict) -> str | None:
    """Why a config is not run, or None if it is."""
    if not entry["loaded"]:
        return "not run: does not load"
    if entry.get("framework", "mmengine").lower() == "huggingface":
        return "not run: transformers Trainer script"
    if entry["arch"] in REMOTE:
        return "load only: remote code"
    if entry["arch"] not in NATIVE and entry["arch"] not in HUB_CODE:
        return "load only: unknown architecture"
    return None


def combination(entry: dict) -> tuple:
    return entry["arch"], entry["method"], entry["data"]


def choose_runs(entries: list[dict], sample: bool) -> list[dict]:
    runnable = [e for e in entries if run_class(e) is None]
    if not sample:
        return runnable
    chosen, seen = [], set()
    for entry in runnable:  # sorted by path: the first config of each combination
        if combination(entry) not in seen:
            seen.add(combination(entry))
            chosen.append(entry)
    return chosen


def run_all(entries: list[dict], root: Path, args, work: Path) -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "datasets", "lmtune.engine.runner",
                                "lmtune.model", "lmtune.dataset"])
    data = write_data(work / "data")
    models_dir = work / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    chosen = choose_runs(entries, args.sample)
    quantized_archs: set[str] = set()
    total = len(chosen)
    for k, entry in enumerate(chosen, 1):
        quantize = entry["method"] != "qlora" or args.qlora == "as-written" or entry["arch"] not in quantized_archs
        if entry["method"] == "qlora" and quantize:
            quantized_archs.add(entry["arch"])
        stem = entry["config"].replace("/", "__").removesuffix(".py")
        job = {"path": str(root / entry["config"]), "arch": entry["arch"],
               "style": tokenizer_style(entry.get("hub_id"), entry["arch"]), "quantize": quantize,
               "fixture": ported_fixture(entry["arch"], entry.get("hub_id")) if entry["arch"] in HUB_CODE else None,
               "models_dir": str(models_dir), "data": data, "work_dir": str(work / "run" / stem),
               "log": str(logs / f"{stem}.log"), "threads": args.threads,
               # sequence parallelism: as many processes as the config splits each row over
               "world": entry.get("sequence_parallel", 1) if args.sequence_parallel == "as-written" else 1}
        outcome = run_in_child(ctx, job, args.timeout, work)
        shutil.rmtree(work / "run" / stem, ignore_errors=True)
        entry["run"] = {**outcome, "quantized": entry["method"] == "qlora" and quantize}
        line = f"[{k}/{total}] {outcome['status']:7s} {outcome['seconds']:6.1f}s  {entry['config']}"
        if outcome["status"] == "failed":  # again, relaxed (see shrink): what else stands in the way?
            job.update(relaxed=True, log=job["log"].removesuffix(".log") + ".relaxed.log")
            retry = run_in_child(ctx, job, args.timeout, work)
            shutil.rmtree(work / "run" / stem, ignore_errors=True)
            entry["run"]["relaxed"] = {k2: retry.get(k2) for k2 in ("status", "error", "seconds")}
            line += f"\n      {outcome.get('error', '')}\n      relaxed: {retry['status']}"
        elif outcome["status"] != "ran":
            line += f"\n      {outcome.get('error', '')}"
        print(line, flush=True)


# --------------------------------------------------------------------------- the report

# What each known failure message means, and whose side it is on (written by hand from the runs of
# 2026-11; a message that matches none gets no diagnosis).
KNOWN_CAUSES = [
    (r"ThroughputHook", "lmtune: has no ThroughputHook yet"),
    (r"transformers_models\.deepseek_v2",
     "lmtune: no stand-in for XTuner's own `DeepseekV2ForCausalLM` (its `moe_implementation`/"
     "`expert_in_one_shard` arguments); transformers ships DeepseekV2"),
    (r"preference_collate_fn", "out of SFT scope: DPO configs kept in the minicpm folder"),
    (r"lmtune does not split sequences", "lmtune (before issue 18): sequence parallelism was refused"),
    (r"sequence_parallel_size=\d+ must be a positive integer dividing",
     "harness: one process; sequence parallelism needs as many processes as the config's size"),
    (r"ParamWrapper does not work with lora_dropout",
     "lmtune × transformers 5: Mixtral's experts are fused 3-D parameters; peft maps the config's "
     "`target_modules` w1/w2/w3 to them as `ParamWrapper`s, which refuse `lora_dropout` != 0"),
    (r"unexpected keyword argument 'load_in_8bit'",
     "lmtune × transformers 5: `from_pretrained(load_in_8bit=True)` no longer exists; it is "
     "`quantization_config=BitsAndBytesConfig(load_in_8bit=True)` now"),
    (r"does not keep packed samples apart",
     "harness: bfloat16 rounding of a random tiny model exceeds the packing check's 2% tolerance "
     "(the same model in float32: 1e-6)"),
    (r"FlashAttention2", "environment: the config sets `attn_implementation=\"flash_attention_2\"` "
                         "(flash-attn needs a GPU)"),
    (r"openmind_hub|modelscope", "needs hub: a ModelScope/openMind package"),
]


def diagnosis(message: str) -> str:
    return next((cause for pattern, cause in KNOWN_CAUSES if re.search(pattern, message)), "")


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else f"{part}/0"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status(entry: dict) -> str:
    """The outcome of one config: ran / failed / timeout / crashed, or why it was not run."""
    reason = run_class(entry)
    if reason is not None:
        return reason
    if "run" not in entry:
        return "not run: outside the sample" if entry.get("sampled_out") else "not run"
    return entry["run"]["status"]


def scope_text(settings: dict) -> str:
    if settings.get("scope") == "preference":
        return (f"Scope: the preference configs of XTuner's `xtuner/configs` tree (the "
                f"{', '.join(sorted(PREFERENCE_DIRS))} folders, and configs elsewhere that call "
                f"`{PREFERENCE_MARK}`): ")
    return f"Scope: the `.py` files of XTuner's `xtuner/configs` tree outside {', '.join(sorted(EXCLUDED_DIRS))}: "


def report(entries: list[dict], settings: dict, seconds: dict[str, float]) -> str:
    """The Markdown report; ``settings``: the run's ``threads`` and ``sample``."""
    import torch
    import transformers

    engine = [e for e in entries if e.get("framework", "mmengine").lower() != "huggingface"]
    trainer_scripts = [e for e in entries if e not in engine]
    loaded = [e for e in engine if e["loaded"]]
    ported = HUB_CODE - REMOTE
    native_all = [e for e in engine if e["arch"] in NATIVE]
    native_loaded = [e for e in loaded if e["arch"] in NATIVE]
    port_all = [e for e in engine if e["arch"] in ported]
    port_loaded = [e for e in loaded if e["arch"] in ported]
    runnable_all, runnable_loaded = native_all + port_all, native_loaded + port_loaded
    ran = [e for e in engine if status(e) == "ran"]
    attempted = [e for e in engine if "run" in e]
    title = "preference configs" if settings.get("scope") == "preference" else "configs"
    out = [f"# XTuner v0.2.0 {title} in lmtune: load and run share", "",
           f"Measured by `benchmarks/xtuner_configs.py` on {time.strftime('%Y-%m-%d')} "
           f"(torch {torch.__version__}, transformers {transformers.__version__}, CPU, "
           f"{settings['threads']} threads). Load pass: {seconds['load']:.0f} s"
           + (f"; run pass: {seconds['run'] / 60:.1f} min ({len(attempted)} runs)." if "run" in seconds else "."),
           "",
           scope_text(settings) +
           f"{len(entries)} files, of which {len(trainer_scripts)} are scripts for transformers' `Trainer` "
           "(`framework = \"huggingface\"`, no XTuner engine parts; lmtune has no Trainer path) and "
           f"{len(engine)} are XTuner engine configs. Shares below are of the {len(engine)} engine configs.", ""]
    rows = [["load (`Config.fromfile`)", pct(len(loaded), len(engine))]]
    if attempted:
        sample_note = " (stratified sample)" if settings["sample"] else ""
        rows += [
            ["architecture shipped by transformers (runnable with a tiny model)",
             f"{len(native_all)} configs, {len(native_loaded)} of them load"],
            ["hub-code architecture with an lmtune port (" + ", ".join(sorted(ported)) + ")",
             f"{len(port_all)} configs, {len(port_loaded)} of them load"],
            [f"run 2 iterations{sample_note} / attempted", pct(len(ran), len(attempted))],
            ["run / loadable", pct(len(ran), len(loaded))],
            ["run / runnable architecture (transformers-native or ported)", pct(len(ran), len(runnable_all))],
            ["run / runnable and loadable", pct(len(ran), len(runnable_loaded))],
            ["hub-code (ported) configs run / attempted",
             pct(sum(status(e) == "ran" for e in attempted if e["arch"] in ported),
                 sum(e["arch"] in ported for e in attempted))],
        ]
        rescued = [e for e in attempted if e["run"].get("relaxed", {}).get("status") == "ran"]
        rows.append(["failed as written, ran relaxed (float32, sdpa)", len(rescued)])
        hub = [e for e in attempted if e.get("hub")]
        if hub:
            rows.append(["of the attempted: ModelScope/openMind configs (hub loaders replaced like HF ones)",
                         f"{len(hub)}, {sum(status(e) == 'ran' for e in hub)} ran"])
        quantized = [e for e in attempted if e["run"].get("quantized")]
        unquantized = [e for e in attempted if e["method"] == "qlora" and not e["run"].get("quantized")]
        if quantized:
            rows.append(["QLoRA configs run with 4-bit quantization on", pct(sum(status(e) == "ran" for e in quantized),
                                                                             len(quantized))])
        if unquantized:
            rows.append(["QLoRA configs run with `quantization_config=None`",
                         pct(sum(status(e) == "ran" for e in unquantized), len(unquantized))])
    out += ["## Totals", "", md_table(["", "count"], rows), ""]
    if trainer_scripts:
        out += ["Trainer scripts (outside the shares): " + ", ".join(f"`{e['config']}`" for e in trainer_scripts), ""]

    # per family and per architecture
    def breakdown(key: str, title: str) -> None:
        groups: dict[str, list[dict]] = defaultdict(list)
        for e in engine:
            groups[e.get(key) or "?"].append(e)
        rows = []
        for name in sorted(groups):
            g = groups[name]
            counts = Counter(status(e) for e in g)
            rows.append([name, len(g), sum(e["loaded"] for e in g),
                         ("yes" if name in NATIVE else "port" if name in ported else "no") if key == "arch"
                         else sum(e["arch"] in NATIVE or e["arch"] in ported for e in g),
                         counts["ran"], counts["failed"] + counts["timeout"] + counts["crashed"],
                         counts["load only: remote code"]])
        header = [title, "configs", "load", "runnable (transformers or port)" if key == "arch" else "runnable arch",
                  "ran", "run failed", "load only (remote code)"]
        out.extend([f"## By {title}", "", md_table(header, rows), ""])

    breakdown("family", "family")
    breakdown("arch", "architecture")
    if attempted:
        groups = defaultdict(list)
        for e in attempted:
            groups[e["method"]].append(e)
        out += ["## Runs by method", "",
                md_table(["method", "attempted", "ran"], [[m, len(g), sum(status(e) == "ran" for e in g)]
                                                          for m, g in sorted(groups.items())]), ""]

    # failures
    def failures(items: list[tuple[str, dict]], title: str, extra: str = "", retried: bool = False) -> None:
        groups: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        for message, e in items:
            groups[group_key(message)].append((message, e))
        rows = []
        for key, g in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            message, example = g[0]
            row = [len(g), re.sub(r"\S+\.py(:\d+)?: ", "", message), f"`{example['config']}`"]
            if retried:
                row.append(sum(e["run"].get("relaxed", {}).get("status") == "ran" for _, e in g))
            rows.append(row + [diagnosis(key)])
        header = ["configs", "error", "example"] + (["of them ran relaxed"] if retried else []) + ["diagnosis"]
        out.extend([f"## {title}", ""] + ([extra, ""] if extra else []))
        out.extend([md_table(header, rows) if rows else "none", ""])

    failures([(e["load_error"], e) for e in engine if not e["loaded"]], "Load failures")
    if attempted:
        failures([(f"[{e['run'].get('stage', e['run']['status'])}"
                   + (f" @ {e['run']['where']}" if e["run"].get("where") else "") + f"] {e['run'].get('error', '')}", e)
                  for e in attempted if e["run"]["status"] != "ran"], "Run failures",
                 "Stage: where the run stopped (build: `Runner.from_config`; train: `runner.train()`); "
                 "`@`: the innermost lmtune frame. Each failed run was tried once more, relaxed: every dtype of the "
                 "config set to float32 (weights, 4-bit compute, mixed precision), `attn_implementation="
                 "\"flash_attention_2\"` replaced by `\"sdpa\"` (a sequence-parallel config again in as many "
                 "processes as its size); \"ran relaxed\" counts the configs that then ran, i.e. whose only "
                 "obstacle was half precision on a CPU with a random tiny model, or flash-attn.",
                 retried=True)
    if attempted and settings["sample"]:
        rows = []
        for e in attempted:
            same = [x for x in engine if run_class(x) is None and combination(x) == combination(e)]
            rows.append([e["arch"], e["method"], e["data"], len(same), f"`{e['config']}`", status(e)])
        out += ["## Per combination (the sample: first config of each architecture × method × data)", "",
                md_table(["architecture", "method", "data", "configs", "run config", "outcome"], rows), ""]
    if attempted:
        rows = [[f"`{e['config']}`", e["arch"], e["method"], e["data"] + (f" ({e['hub']})" if e.get("hub") else ""),
                 e.get("template") or "-",
                 status(e) + (" (4-bit)" if e["run"].get("quantized") else ""), e["run"].get("seconds", "")]
                for e in attempted]
        out += ["## Every run", "", md_table(["config", "architecture", "method", "data", "template", "outcome",
                                              "seconds"], rows), ""]
    out += ["## Method", "", (__doc__ or "").split("Usage::")[0].strip(), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-root", type=Path, default=DEFAULT_CONFIG_ROOT)
    parser.add_argument("--run", action="store_true", help="also run each loadable config on a tiny model")
    parser.add_argument("--limit", type=int, help="only the first N configs (after --only)")
    parser.add_argument("--only", help="only configs whose path matches this regular expression")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "xtuner_configs.md")
    parser.add_argument("--json", type=Path, help="write every config's result here")
    parser.add_argument("--sample", action="store_true",
                        help="run only the first config of each architecture x method x data combination")
    parser.add_argument("--qlora", choices=("as-written", "off"), default="as-written",
                        help="off: QLoRA configs run without quantization, but the first of each architecture")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (shared by its processes)")
    parser.add_argument("--sequence-parallel", choices=("as-written", "off"), default="as-written",
                        help="as-written: a config with sequence_parallel_size N runs in N processes (gloo); "
                             "off: in one, with sequence_parallel_size 1")
    parser.add_argument("--work-dir", type=Path, help="keep tiny models, data and run logs here")
    parser.add_argument("--report-from", type=Path, help="only write the report of a saved --json file")
    parser.add_argument("--scope", choices=("sft", "preference"), default="sft",
                        help="preference: the dpo, orpo and reward_model configs (and minicpm's DPO ones)")
    args = parser.parse_args(argv)
    if args.report_from:
        saved = json.loads(args.report_from.read_text(encoding="utf-8"))
        text = report(saved["entries"], saved["settings"], saved["seconds"])
        print(text)
        args.out.write_text(text, encoding="utf-8")
        return 0

    root = args.config_root.resolve()
    files = discover(root, args.scope)
    if args.only:
        files = [p for p in files if re.search(args.only, str(p.relative_to(root)))]
    if args.limit:
        files = files[: args.limit]
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="xtuner_cfg_run_"))
    work.mkdir(parents=True, exist_ok=True)
    # offline, and every cache in the work dir
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      LMTUNE_CACHE=str(work / "lmtune_cache"), HF_DATASETS_CACHE=str(work / "hf_datasets"),
                      TOKENIZERS_PARALLELISM="false")
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        entries = load_all(files, root)
        seconds["load"] = time.perf_counter() - start
        print(f"loaded {sum(e['loaded'] for e in entries)}/{len(entries)} in {seconds['load']:.1f} s", flush=True)
        if args.run:
            start = time.perf_counter()
            run_all(entries, root, args, work)
            seconds["run"] = time.perf_counter() - start
            if args.sample:
                for e in entries:
                    if run_class(e) is None and "run" not in e:
                        e["sampled_out"] = True
        settings = {"threads": args.threads, "sample": args.sample, "scope": args.scope}
        text = report(entries, settings, seconds)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.json:
        saved = {"settings": settings, "seconds": seconds, "entries": entries}
        args.json.write_text(json.dumps(saved, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
