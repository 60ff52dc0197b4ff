"""Local model directories in the hub's own layout, for the ported hub-code families (offline).

The weights and configs come from ``tests/fixtures/ports/<name>`` (made by tools/port_fixtures.py with
the families' original code). A tokenizer in the family's style is trained here with the
``sentencepiece`` library, and the repository's code files are stand-ins (lmtune must never run them;
an export must copy them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ports"
STAND_IN_CODE = "raise RuntimeError('hub code of the test fixture: lmtune must not run it')\n"

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Say hello. Hello! Again, louder. HELLO!",
    "Please tell me five scenic spots in Shanghai. 请给我介绍五个上海的景点",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Count to three. One, two, three. What is two plus two? Two plus two is four. tac cat",
    "### Human: ### Assistant: user assistant system 0123456789",
] * 20

INTERNLM2_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                      "<|plugin|>"]


def train_sentencepiece(prefix: Path, vocab_size: int, user_defined: list[str]) -> Path:
    """A BPE SentencePiece model as InternLM2's: byte fallback, <unk>=0 <s>=1 </s>=2, chat markers as
    user-defined pieces, digits split, a dummy prefix."""
    import sentencepiece as spm

    prefix.parent.mkdir(parents=True, exist_ok=True)
    corpus = prefix.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=user_defined,
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2)
    return prefix.with_suffix(".model")


def _added_tokens(model_file: Path, names: list[str]) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    decoder = {}
    for name in ["<unk>", "<s>", "</s>", *names]:
        decoder[str(sp.piece_to_id(name))] = {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
    return decoder


def hub_dir(root: Path, fixture: str, code_files: tuple[str, ...], tokenizer_class: str, auto_tokenizer: list,
            specials: list[str], **tokenizer_config) -> Path:
    """A hub-layout repository: config.json with auto_map, the fixture's weights, stand-in code files and a
    SentencePiece tokenizer in the family's style (``tokenizer_class`` in tokenizer_config.json)."""
    target = root / fixture
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES / fixture / name, target / name)
    vocab = min(400, json.loads((target / "config.json").read_text())["vocab_size"])  # the model may have more rows
    for name in code_files:
        (target / name).write_text(STAND_IN_CODE)
    model_file = train_sentencepiece(target / "sp" / "tokenizer", vocab, specials)
    shutil.move(str(model_file), target / "tokenizer.model")
    shutil.rmtree(target / "sp")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "auto_map": {"AutoTokenizer": auto_tokenizer},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": specials,
        "added_tokens_decoder": _added_tokens(target / "tokenizer.model", specials),
        "model_max_length": 1000000, **tokenizer_config}, indent=1))
    (target / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "additional_special_tokens": specials}, indent=1))
    return target


def internlm2_dir(root: Path, fixture: str = "internlm2") -> Path:
    """A hub-layout InternLM2 repository (InternLM2Tokenizer, InternLM2's chat markers)."""
    return hub_dir(root, fixture, ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                                   "tokenization_internlm2_fast.py"), "InternLM2Tokenizer",
                   ["tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"],
                   INTERNLM2_SPECIALS)


def internlm3_dir(root: Path) -> Path:
    """A hub-layout InternLM3 repository (InternLM3Tokenizer, the same chat markers)."""
    return hub_dir(root, "internlm3", ("configuration_internlm3.py", "modeling_internlm3.py",
                                       "tokenization_internlm3.py"), "InternLM3Tokenizer",
                   ["tokenization_internlm3.InternLM3Tokenizer", None], INTERNLM2_SPECIALS[:2])


def sentencepiece_ids(model_file: Path, text: str, specials: list[str], bos: bool = True) -> list[int]:
    """What a slow sentencepiece tokenizer of the hub code gives: BOS (if it adds one), then the text
    split at its special tokens, each piece encoded by sentencepiece on its own, the specials as their ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    marks = ["<s>", "</s>", "<unk>", *specials]
    ids = [sp.bos_id()] if bos else []
    for chunk in re.split("(" + "|".join(re.escape(m) for m in marks) + ")", text):
        if chunk in marks:
            ids.append(sp.piece_to_id(chunk))
        elif chunk:
            ids += sp.encode(chunk)
    return ids


def train_library_config(name: str, hub: Path, tmp_path: Path, **overrides):
    """Run the library config ``name`` for one short epoch on the hub-layout dir ``hub`` (fp32, tiny data of
    the config's kind); the runner, after asserting that it packed, ran no remote code and logged finite losses."""
    import torch
    from conftest import OASST1_ROWS, alpaca_rows, write_jsonl

    from lmtune.configs import load_config
    from lmtune.engine.runner import Runner

    data = tmp_path / "data"
    write_jsonl(data / "alpaca.jsonl", alpaca_rows() * 3)
    write_jsonl(data / "oasst1" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 3)
    chats = [{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}] * 8
    write_jsonl(data / "chats.jsonl", chats)
    options = {"pretrained_model_name_or_path": str(hub), "max_length": 96, "max_epochs": 1, "accumulative_counts": 1,
               "save_steps": 1000, "evaluation_inputs": ["Hi."], "max_new_tokens": 2,
               "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32"}
    if "alpaca" in name:
        options.update(data_path="json", **{"train_dataset.dataset.data_files": str(data / "alpaca.jsonl")})
    elif "oasst1" in name:
        options["data_path"] = str(data / "oasst1")
    else:
        options["data_files"] = str(data / "chats.jsonl")
    if "qlora" in name:
        options["model.llm.quantization_config.bnb_4bit_compute_dtype"] = torch.float32
    cfg = load_config(name, {**options, **overrides})
    assert cfg.pack_to_max_length is True and "trust_remote_code" not in cfg.model.llm
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    assert "num_tokens" in runner.train_dataloader.dataset.column_names  # packed
    runner.train()
    losses = [json.loads(line)["loss"] for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)
    return runner


BAICHUAN_RESERVED = ["<reserved_102>", "<reserved_103>", "<reserved_106>", "<reserved_107>"]


def baichuan_dir(root: Path, fixture: str = "baichuan2_7b") -> Path:
    """A hub-layout Baichuan repository (BaichuanTokenizer). Baichuan's chat markers (``<reserved_N>``) are
    ordinary pieces of its SentencePiece model, not added tokens; Baichuan2's tokenizer adds no BOS
    (``add_bos_token: false``), Baichuan-7B's says nothing (the tokenizer's default: BOS)."""
    code = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
    v2 = fixture.startswith("baichuan2")
    extra = {"add_bos_token": False} if v2 else {}
    target = hub_dir(root, fixture, code + (("generation_utils.py",) if v2 else ()), "BaichuanTokenizer",
                     ["tokenization_baichuan.BaichuanTokenizer", None], BAICHUAN_RESERVED,
                     additional_special_tokens=[], **extra)
    config = json.loads((target / "tokenizer_config.json").read_text())
    if not v2:
        config.pop("add_bos_token")
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return target


def internlm_dir(root: Path, fixture: str = "internlm") -> Path:
    """A hub-layout InternLM (v1) repository: InternLMTokenizer (SentencePiece, BOS added); its chat markers
    ``<eoh>`` and ``<eoa>`` are pieces of the SentencePiece model."""
    target = hub_dir(root, fixture, ("configuration_internlm.py", "modeling_internlm.py", "tokenization_internlm.py"),
                     "InternLMTokenizer", ["tokenization_internlm.InternLMTokenizer", None], ["<eoh>", "<eoa>"],
                     additional_special_tokens=[])
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return target


def hub_dir_for(root: Path, fixture: str) -> Path:
    """The hub-layout repository of any port fixture, with a tokenizer in its family's style (the families'
    builders live here and in tests/hub_models_<family>.py)."""
    import hub_models_chatglm
    import hub_models_deepseek
    import hub_models_minicpm
    import hub_models_qwen

    builders = [("internlm2", internlm2_dir), ("internlm3", lambda r, f: internlm3_dir(r)), ("internlm", internlm_dir),
                ("baichuan", baichuan_dir), ("chatglm", hub_models_chatglm.chatglm_dir),
                ("deepseek", hub_models_deepseek.deepseek_dir), ("minicpm3", hub_models_minicpm.minicpm3_dir),
                ("minicpm", hub_models_minicpm.minicpm_dir),
                ("qwen", lambda r, f: hub_models_qwen.qwen_dir(r, f, rows=hub_models_qwen.QWEN_7B_VOCAB))]
    for prefix, build in builders:
        if fixture.startswith(prefix):
            return build(Path(root), fixture)
    raise KeyError(f"no hub-dir builder for fixture {fixture!r}")
