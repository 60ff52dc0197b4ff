"""Fixtures of the ChatGLM2 / ChatGLM3 family, from git mirrors of the Hugging Face repositories on GitHub.

The THUDM repositories' code is on no PyPI package in its original form (optimum-habana 1.21.2 ships a
Gaudi rewrite of it), so the references run copies found on GitHub, which ``_mirror`` reads from a local
bare clone made by the session's ``fetch`` tool (``/work/.mirror/<owner>+<name>/repo``) or clones itself
into ``benchmarks/.port_refs_cache`` (ignored by git; nothing of theirs is committed), at these commits:

- ChatGLM3-6B: ``czk1997/chatglm3-copy`` at 456aa875cf1f46623006edaa23103774ea9c0eae, a mirror of
  huggingface.co/THUDM/chatglm3-6b (its history is the hub repository's, last commit "fix piece id out
  of range (#20)", 2023-12-07): ``configuration_chatglm.py``, ``modeling_chatglm.py`` as they are;
- ChatGLM3-6B-32K (``rope_ratio``): ``DracoUnion/chatglm3-6b-int4-lora`` at
  044e47902cb8436ec74341ba57ee8f04ef954ac5, ``model/`` (config.json names THUDM/chatglm3-6b-32k): its
  ``modeling_chatglm.py`` is ChatGLM3-6B's plus ``rope_ratio`` (``base = base * self.rope_ratio``) and a
  LoRA helper it imports (``model/lora.py``, copied beside it; it adds methods, none of which runs here);
  its configuration defaults ``quantization_bit`` to 4, which the fixture's config.json sets to 0;
- ChatGLM2-6B: ``syjjhl/chatglm2-6b`` at 8fd7fba285f7171d3ae7ea3b35c53b6340501ed1, a mirror of
  huggingface.co/THUDM/chatglm2-6b (last commit "Merge branch 'classifier'", 2023-09-08). Its model is
  ChatGLM3's except that the rotary angles are computed in the model's dtype (fp32 here, the same).

Each fixture's hub dir gets ``configuration_chatglm.py``, ``modeling_chatglm.py`` and ``quantization.py``
(the modeling file imports it, inside a function, which transformers' dynamic-module check wants present;
nothing of it runs). No shim changes the math. The hub models build their layers with ``skip_init``
(uninitialised memory) unless ``empty_init=False``, and their RMSNorm weights with ``torch.empty``; the
reference builds with ``empty_init=False`` and then sets every weight from the seed (normal, std 0.02; norms
one) before the perturbation every fixture gets. Variants, one per thing that changes the math:

- ``chatglm3``: multi-query attention (2 key/value groups), biased q/k/v, ``kv_channels`` 16;
- ``chatglm3_rope_ratio``: the same with ``rope_ratio`` 50 (ChatGLM3-6B-32K's), ChatGLM3-6B-32K's code;
- ``chatglm2_mha``: ChatGLM2's code without multi-query attention (``query_key_value`` rows head by
  head), ``kv_channels`` 24 (heads wider than hidden_size / heads), no q/k/v bias.

    benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports \\
        --only chatglm3 chatglm3_rope_ratio chatglm2_mha

The tokenizer fixture (``tests/fixtures/ports/chatglm_tokenizer``: a SentencePiece model trained here as
ChatGLM's was, and ``reference.json``, the ids, pairs, padding and decoding that ChatGLM3's tokenizer, with
and without ``encode_special_tokens``, and ChatGLM2's give on it) comes from the same two mirrors'
``tokenization_chatglm.py``, run under transformers 4.48 with the shims ``_original_tokenizer`` describes:

    benchmarks/.venv-xtuner/bin/python tools/port_refs/chatglm.py tests/fixtures/ports/chatglm_tokenizer

On the real ``tokenizer.model`` (sha256 e7dc4c39..., the same file in ChatGLM2-6B and ChatGLM3-6B; a copy is
in DracoUnion/chatglm3-6b-int4-lora ``model/``), lmtune's tokenizer gave the original's ids for every text of
``TOKENIZER_TEXTS``, the pairs and the decodings, for all three flavours (checked by hand: that file is not
committed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / ".port_refs_cache"
MIRRORS = Path("/work/.mirror")

CHATGLM3 = ("czk1997/chatglm3-copy", "456aa875cf1f46623006edaa23103774ea9c0eae", "")
CHATGLM3_32K = ("DracoUnion/chatglm3-6b-int4-lora", "044e47902cb8436ec74341ba57ee8f04ef954ac5", "model/")
CHATGLM2 = ("syjjhl/chatglm2-6b", "8fd7fba285f7171d3ae7ea3b35c53b6340501ed1", "")
CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py")  # the modeling imports the last


def _git_dir(repo: str) -> Path:
    """A bare clone of ``repo``: the session's mirror if there is one, else one cloned into the cache."""
    mirror = MIRRORS / repo.replace("/", "+") / "repo"
    if mirror.is_dir():
        return mirror
    clone = CACHE / "git" / repo.replace("/", "+")
    if not clone.is_dir():
        clone.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--bare", "--filter=blob:limit=1m", f"https://github.com/{repo}.git",
                        str(clone)], check=True)
    return clone


def _mirror(repo: str, commit: str, under: str, files: tuple[str, ...]) -> Path:
    """``files`` of ``repo`` at ``commit`` (in its folder ``under``), written once into the cache."""
    target = CACHE / f"{repo.replace('/', '+')}-{commit[:12]}"
    if not all((target / f).is_file() for f in files):
        target.mkdir(parents=True, exist_ok=True)
        git = _git_dir(repo)
        for name in files:
            text = subprocess.run(["git", f"--git-dir={git}", "show", f"{commit}:{under}{name}"], check=True,
                                  capture_output=True).stdout
            (target / name).write_bytes(text)
    return target


def _build(hub_dir: Path):
    """The hub code's model of a hub dir, its weights set from the seed (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(hub_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32,
                                             empty_init=False).to(torch.float32)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    return model


_TINY = dict(hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4, kv_channels=16,
             padded_vocab_size=512, seq_length=64, layernorm_epsilon=1e-5, rmsnorm=True,
             apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
             add_qkv_bias=True, bias_dropout_fusion=True, multi_query_attention=True, multi_query_group_num=2,
             apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, fp32_residual_connection=False,
             hidden_dropout=0.0, attention_dropout=0.0, original_rope=True, use_cache=True,
             tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"}
_GRADS = ("transformer.encoder.layers.0.self_attention.query_key_value.weight",
          "transformer.encoder.layers.0.self_attention.query_key_value.bias",
          "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
          "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
          "transformer.encoder.layers.0.self_attention.dense.weight", "transformer.output_layer.weight",
          "transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm.weight",
          "transformer.encoder.layers.0.input_layernorm.weight")


def _hub(name: str, **changes) -> dict:
    return {"_name_or_path": name, "model_type": "chatglm", "architectures": ["ChatGLMModel"], "auto_map": _MAP,
            **{**_TINY, **changes}}


SPECS = {
    "chatglm3": {
        "code": lambda: _mirror(*CHATGLM3, CODE), "files": CODE, "build": _build,
        "hub": _hub("THUDM/chatglm3-6b"), "grads": _GRADS, "lora_target": "dense"},
    "chatglm3_rope_ratio": {
        "code": lambda: _mirror(*CHATGLM3_32K, (*CODE, "lora.py")), "files": (*CODE, "lora.py"), "build": _build,
        "hub": _hub("THUDM/chatglm3-6b-32k", rope_ratio=50, quantization_bit=0), "grads": _GRADS[:3],
        "lora_target": "dense_h_to_4h"},
    "chatglm2_mha": {
        "code": lambda: _mirror(*CHATGLM2, CODE), "files": CODE, "build": _build,
        "hub": _hub("THUDM/chatglm2-6b", multi_query_attention=False, kv_channels=24, add_qkv_bias=False),
        "grads": (_GRADS[0], _GRADS[2], _GRADS[4]), "lora_target": "dense"},
}


# ------------------------------------------------------------------ the tokenizer fixture

TOKENIZER_TEXTS = [
    "What is the capital of France?", "<|user|>\n Say hello.<|assistant|>\n Hi</s>",
    "请给我介绍五个上海的景点 42 and 3.14",
    "  two  spaces,\ttab\n\nnewlines", "a</s>b<s> c<unk>", "[gMASK]sop [MASK] eop [sMASK]", "emoji 🙂 and ẞ unseen",
    "<|system|>\n You are helpful.<|user|>\n Count to three.<|assistant|>\n One, two, three.<|observation|>", " lead",
    "trail  ", "\n\nx", "<|user|>", "", "Below is an instruction that describes a task."]
TOKENIZER_PAIRS = [("Say hello.", "Hello!"), ("", "x")]


def train_tokenizer(target: Path, vocab_size: int = 400) -> Path:
    """A BPE SentencePiece model trained as ChatGLM's was (its tokenizer.model's trainer spec: byte fallback,
    digits split, no normalisation, whitespace-only pieces, a dummy prefix, <unk> <s> </s> = 0 1 2), on the
    test corpus of tests/hub_models.py."""
    import sys

    import sentencepiece as spm

    sys.path.insert(0, str(ROOT / "tests"))
    from hub_models import CORPUS

    target.mkdir(parents=True, exist_ok=True)
    corpus = target / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(target / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    corpus.unlink()
    (target / "tokenizer.vocab").unlink()
    return target / "tokenizer.model"


def _original_tokenizer(code_dir: Path, model_file: Path, chatglm2: bool, **kwargs):
    """The hub's ChatGLMTokenizer on ``model_file``, with two shims for transformers 4.48 (neither changes an id):
    its ``_pad`` (written before transformers passed ``padding_side``) gets that argument dropped, and ChatGLM2's
    ``__init__``, which reads its vocabulary before making it (transformers >= 4.34 asks for it in the base
    ``__init__``), gets the vocabulary made first."""
    import importlib
    import shutil
    import sys
    import tempfile

    work = Path(tempfile.mkdtemp())
    package = f"_lmtune_ref_chatglm_tok{'2' if chatglm2 else '3'}"
    shutil.copytree(code_dir, work / package)
    (work / package / "__init__.py").write_text("")
    sys.path.insert(0, str(work))
    module = importlib.import_module(f"{package}.tokenization_chatglm")
    original = module.ChatGLMTokenizer

    class Shimmed(original):
        def __init__(self, vocab_file, **kw):
            if chatglm2:
                self.tokenizer = module.SPTokenizer(vocab_file)
            super().__init__(vocab_file, **kw)

        def _pad(self, *args, padding_side=None, **kw):
            return original._pad(self, *args, **kw)

    return Shimmed(str(model_file), **kwargs)


def make_tokenizer_fixture(out: Path) -> None:
    """``out/tokenizer.model`` (trained here) and ``out/reference.json``: what the original ChatGLM3 tokenizer
    (with and without ``encode_special_tokens``) and ChatGLM2 tokenizer give for ``TOKENIZER_TEXTS``."""
    import json

    model_file = train_tokenizer(out)
    reference: dict = {"made_by": "tools/port_refs/chatglm.py", "code": {
        "chatglm3": f"{CHATGLM3[0]}@{CHATGLM3[1]} tokenization_chatglm.py",
        "chatglm2": f"{CHATGLM2[0]}@{CHATGLM2[1]} tokenization_chatglm.py"}}
    flavours = {"chatglm3": (CHATGLM3, False, {}),
                "chatglm3_encode_special_tokens": (CHATGLM3, False, {"encode_special_tokens": True}),
                "chatglm2": (CHATGLM2, True, {})}
    for name, (source, chatglm2, kwargs) in flavours.items():
        code = _mirror(*source, ("tokenization_chatglm.py",))
        tokenizer = _original_tokenizer(code, model_file, chatglm2, **kwargs)
        batch = tokenizer(TOKENIZER_TEXTS[:3], padding=True)
        reference[name] = {
            "class": type(tokenizer).__mro__[1].__name__, "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "padding_side": tokenizer.padding_side,
            "ids": {text: tokenizer(text)["input_ids"] for text in TOKENIZER_TEXTS},
            "no_special": {text: tokenizer.encode(text, add_special_tokens=False) for text in TOKENIZER_TEXTS},
            "pairs": [tokenizer(a, b)["input_ids"] for a, b in TOKENIZER_PAIRS],
            "padded": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            "decode": {text: tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
                       for text in TOKENIZER_TEXTS}}
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chatglm tokenizer fixture: {out}")


if __name__ == "__main__":
    import sys

    make_tokenizer_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "ports" /
                           "chatglm_tokenizer")
