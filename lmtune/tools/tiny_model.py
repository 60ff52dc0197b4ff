"""Tiny Llama-architecture models and BPE tokenizers created locally, offline.

Used by the built-in demo and by the tests: a real ``save_pretrained``
directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
load exactly as they would a downloaded model, made in a few seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

_BASE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. ### Human: ### Assistant: "
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. system user assistant 0123456789 Hello, how are you? "
    "I am fine, thank you. What is the capital of France? The capital of France is Paris."
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(
    save_dir: str | os.PathLike,
    texts: Iterable[str] = (),
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Llama model and its tokenizer to ``save_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe_tokenizer([_BASE_CORPUS, *texts], vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            tokenizer.convert_tokens_to_ids("<|im_end|>")]
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def cached_tiny_llama(name: str, texts: Iterable[str] = (), cache_dir: str | None = None, **kwargs) -> str:
    """``make_tiny_llama`` once per distinct recipe, kept under the user cache dir.

    The directory name carries a digest of the recipe, so changing the corpus or
    a size creates a new model instead of reusing a stale one. Creation is
    atomic: a half-written directory is never taken for a model.
    """
    texts = list(texts)
    digest = hashlib.sha256(json.dumps([texts, sorted(kwargs.items())], default=str).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("LMTUNE_CACHE", Path.home() / ".cache" / "lmtune"))
    target = root / "tiny_models" / f"{name}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny_llama(tmp, texts, **kwargs)
        try:
            os.replace(tmp, target)
        except OSError:  # another process created it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
