"""A local DeepSeek-MoE repository in the hub's layout, for the port's tests (offline).

Weights and config come from ``tests/fixtures/ports/deepseek_moe`` (made with the original modeling code by
tools/port_fixtures.py); the code files are stand-ins (lmtune must never run them). The tokenizer is a tiny
byte-level BPE ``tokenizer.json`` trained here with the ``tokenizers`` library in DeepSeek's style: the
pre-tokenizer splits of DeepSeek LLM / MoE's tokenizer.json (newlines, letter runs with one leading space,
punctuation runs, trailing whitespace, CJK runs, single digits) before byte-level mapping, no normaliser, a
byte-level decoder and a byte-level post-processor (the hub's ``LlamaTokenizerFast`` replaces the latter with
BOS + text on load), ``<｜begin▁of▁sentence｜>`` / ``<｜end▁of▁sentence｜>`` as special tokens, and the
tokenizer_config.json the hub repositories ship (``LlamaTokenizerFast``, ``add_bos_token`` true,
``add_eos_token`` false, DeepSeek's chat template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hub_models import CORPUS, FIXTURES, STAND_IN_CODE

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
# the chat template of deepseek-moe-16b-chat's tokenizer_config.json (DeepSeek LLM's chat format)
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")
# DeepSeek's pre-tokenizer splits (its letter class shortened to the scripts the tests use)
SPLITS = (r"[\r\n]", r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯẞ]+",
          r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", r"[一-龥ࠀ-一가-퟿]+")


def train_deepseek_tokenizer(target: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLITS]
        + [pre_tokenizers.Digits(individual_digits=True),
           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(target / "tokenizer.json"))
    return target / "tokenizer.json"


def _token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def deepseek_dir(root: Path, fixture: str = "deepseek_moe", **tokenizer_config) -> Path:
    """A hub-layout DeepSeek-MoE repository under ``root``."""
    target = root / fixture
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES / fixture / name, target / name)
    for name in CODE_FILES:
        (target / name).write_text(STAND_IN_CODE)
    train_deepseek_tokenizer(target)
    (target / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": _token(BOS), "eos_token": _token(EOS),
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 4096, "pad_token": None,
        "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE, **tokenizer_config}, indent=1, ensure_ascii=False), encoding="utf-8")
    return target
