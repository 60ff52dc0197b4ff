"""Local MiniCPM / MiniCPM3 repositories in the hub's own layout, for tests/test_ports_minicpm.py (offline).

Weights and config.json come from ``tests/fixtures/ports/<name>`` (made by tools/port_fixtures.py from the
original code); the tokenizer is a SentencePiece BPE model trained here in the style of each family, with
the tokenizer_config.json of the released repositories:

- MiniCPM-2B-sft: transformers' own ``LlamaTokenizer`` (no tokenizer code), BOS added, the chat markers
  ``<用户>`` / ``<AI>`` as ordinary (user-defined) pieces;
- MiniCPM3-4B: its ``tokenization_minicpm.MiniCPMTokenizer`` (``LlamaTokenizerFast`` plus tool-call helpers),
  ``add_bos_token: false``, ``eos_token`` ``<|im_end|>``, ``legacy: true``, the ChatML / tool markers as special
  tokens. Its code file is a stand-in that must never run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hub_models import FIXTURES, STAND_IN_CODE, _added_tokens, train_sentencepiece

MINICPM_MARKERS = ["<用户>", "<AI>"]
MINICPM3_SPECIALS = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
                     "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
MODEL_CODE = ("configuration_minicpm.py", "modeling_minicpm.py")


def _base(root: Path, fixture: str, markers: list[str], code: tuple[str, ...]) -> tuple[Path, bool]:
    target = root / fixture
    if (target / "config.json").is_file():
        return target, False
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES / fixture / name, target / name)
    for name in code:
        (target / name).write_text(STAND_IN_CODE)
    vocab = min(400, json.loads((target / "config.json").read_text())["vocab_size"])
    model_file = train_sentencepiece(target / "sp" / "tokenizer", vocab, markers)
    shutil.move(str(model_file), target / "tokenizer.model")
    shutil.rmtree(target / "sp")
    return target, True


def minicpm_dir(root: Path, fixture: str = "minicpm") -> Path:
    """A hub-layout MiniCPM(-2B-sft) repository."""
    target, fresh = _base(root, fixture, MINICPM_MARKERS, MODEL_CODE)
    if fresh:
        (target / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
            "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
            "added_tokens_decoder": _added_tokens(target / "tokenizer.model", []), "model_max_length": 1000000000},
            indent=1, ensure_ascii=False))
        (target / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))
    return target


def minicpm3_dir(root: Path, fixture: str = "minicpm3") -> Path:
    """A hub-layout MiniCPM3(-4B) repository (its MiniCPMTokenizer code as a stand-in)."""
    target, fresh = _base(root, fixture, MINICPM3_SPECIALS, (*MODEL_CODE, "tokenization_minicpm.py"))
    if fresh:
        (target / "tokenizer_config.json").write_text(json.dumps({
            "auto_map": {"AutoTokenizer": ["tokenization_minicpm.MiniCPMTokenizer", None]},
            "add_bos_token": False, "add_eos_token": False,
            "added_tokens_decoder": _added_tokens(target / "tokenizer.model", MINICPM3_SPECIALS),
            "additional_special_tokens": MINICPM3_SPECIALS, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "legacy": True, "model_max_length": 1000000000, "pad_token": None,
            "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "MiniCPMTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": False}, indent=1))
        (target / "special_tokens_map.json").write_text(json.dumps({
            "additional_special_tokens": MINICPM3_SPECIALS, "bos_token": "<s>", "eos_token": "<|im_end|>",
            "unk_token": "<unk>"}, indent=1))
    return target
