"""Qwen (1.0): Qwen-1.8B, Qwen-7B, Qwen-14B, Qwen-72B and their Chat models, on transformers' Qwen2.

The hub checkpoints (``model_type`` "qwen", ``QWenLMHeadModel``) are GPT-named Qwen2 blocks:
``transformer.wte`` (embeddings), ``transformer.h.N.ln_1`` / ``ln_2`` (RMSNorm, ``layer_norm_epsilon``),
``attn.c_attn`` (one fused, biased [q; k; v] projection of full multi-head attention, split with ``Chunk``),
``attn.c_proj`` (no bias), ``mlp.w1`` / ``w2`` / ``c_proj`` computing ``c_proj(w1(x) * silu(w2(x)))`` with
``intermediate_size // 2`` channels (so ``w2`` is the gate, ``w1`` the up projection), ``transformer.ln_f``
and ``lm_head``. That is exactly transformers' ``Qwen2ForCausalLM`` (biased q, k, v; no o bias), whose names
the weights take on load and give back on save. RoPE: ``rotary_emb_base`` (``rotary_pct`` must be 1, as in
every release).

Beyond ``seq_length`` (the training length: 2048 to 32768 by model) the hub code changes inference, in eval
mode only, with two switches (true in the Qwen-7B/14B configs):

- ``use_dynamic_ntk``: the RoPE base becomes ``base * a ** (d / (d - 2))`` with
  ``a = max(1, 2 ** ceil(log2(L / seq_length) + 1) - 1)`` for an input of ``L`` tokens (``a`` is 1 up to
  ``seq_length``, then 3, 7, 15...); during generation the hub keeps the prompt's ``a``;
- ``use_logn_attn``: the query at position ``p`` is scaled by ``max(1, log(p + 1) / log(seq_length))``.

Both are identity in training and for inputs up to ``seq_length`` tokens (``a`` is 1, every scale is 1), so
they never touch what lmtune trains on its usual lengths. lmtune reproduces both anyway, in eval mode
(``QwenRotaryEmbedding``, ``QwenLognAttention``), with positions taken from the position ids: ``a`` from
each sample's length (a packed row's samples each get their own, as they would alone), kept from the
prompt while a generation continues with a cache (as the hub code does), the log-n scale from each
token's position. The tests check this against the hub code's logits beyond ``seq_length`` (fixture
``qwen_ntk_logn``), cached decoding across ``seq_length`` included. Where the hub code, for a batch of
left-padded prompts longer than ``seq_length``, takes ``a`` per row from the attention mask, lmtune takes
it from each row's positions.

Not reproduced (none of it is in the released configs or changes what lmtune computes on them):
``kv_channels`` other than ``hidden_size / num_attention_heads`` (the hub code does not run then either),
``rotary_pct`` < 1 and ``no_bias: false`` (``ConfigError``); ``emb_dropout_prob`` (a warning; lmtune's
model has no embedding dropout); ``scale_attn_weights`` (the hub code always scales by ``1/sqrt(d)``, as
lmtune does); ``bf16``/``fp16``/``fp32``/``use_flash_attn`` (the hub code's own dtype and kernel choice;
lmtune's dtype and attention settings apply); the hub's KV-cache quantisation (``use_cache_quantization``,
inference only). The hub code takes positions from the tokens' places in the row and ignores
``position_ids``; lmtune follows the position ids (the same without packing; packed samples then start at
0 as alone). With an ``attention_mask`` the hub's sdpa path also loses its causal mask (its ``masked_fill``
result is discarded, so every token attends to the whole row); lmtune stays causal.

LoRA ``target_modules`` written for the hub code map to the port's layers (``HUB_LINEAR_NAMES``): ``c_attn``
becomes separate adapters on ``q_proj``, ``k_proj`` and ``v_proj`` (not one adapter on the fused matrix),
``c_proj`` both ``o_proj`` and ``down_proj`` (as it names both in the hub model), ``w1`` ``up_proj``, ``w2``
``gate_proj``.

The tokenizer is tiktoken's BPE over ``qwen.tiktoken`` with Qwen's split pattern, NFC-normalised text,
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and ``<|extra_0|>``..``<|extra_204|>`` at ids 151643
onwards (special in any text), no BOS or EOS added; lmtune builds it with the ``tokenizers`` library.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk
from transformers.models.qwen2.modeling_qwen2 import (
    ALL_ATTENTION_FUNCTIONS,
    Qwen2Attention,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.llama_like import rope_parameters
from lmtune.model.ports.ops import hub_mapping

# ------------------------------------------------------------------ the config


@strict
class QwenNativeConfig(Qwen2Config):
    """``Qwen2Config`` plus Qwen-1's long-context switches (eval mode, beyond ``seq_length`` only)."""

    model_type = "qwen"

    seq_length: int = 2048
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False


def native_config(hub: dict) -> QwenNativeConfig:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hub]
    if missing:
        raise ConfigError(f"Qwen config.json lacks {', '.join(missing)}: is it a Qwen (1.0) checkpoint?")
    hidden, heads = int(hub["hidden_size"]), int(hub["num_attention_heads"])
    kv_channels = int(hub.get("kv_channels", 128))
    if kv_channels * heads != hidden:
        raise ConfigError(f"Qwen config.json has kv_channels={kv_channels} with {heads} heads and hidden_size "
                          f"{hidden}: Qwen's attention needs kv_channels * num_attention_heads == hidden_size "
                          "(as in every release; the hub code splits c_attn by hidden_size)")
    if float(hub.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"Qwen config.json has rotary_pct={hub['rotary_pct']}: lmtune's Qwen port rotates the "
                          "whole head (rotary_pct 1.0, as every release)")
    if hub.get("no_bias", True) is not True:
        raise ConfigError("Qwen config.json has no_bias=false (biased c_proj and MLP): lmtune's Qwen port "
                          "(transformers' Qwen2) covers the released no_bias=true only")
    if int(hub["intermediate_size"]) % 2:
        raise ConfigError(f"Qwen config.json: intermediate_size {hub['intermediate_size']} is odd (the MLP has "
                          "intermediate_size // 2 channels in each of w1 and w2)")
    if float(hub.get("emb_dropout_prob") or 0.0):
        from lmtune.core.device import warn_once

        warn_once(f"Qwen config.json has emb_dropout_prob={hub['emb_dropout_prob']}: lmtune's Qwen port applies no "
                  "dropout to the embeddings")
    seq_length = int(hub.get("seq_length") or hub.get("max_position_embeddings") or 2048)
    return QwenNativeConfig(
        vocab_size=hub["vocab_size"], hidden_size=hidden, intermediate_size=int(hub["intermediate_size"]) // 2,
        num_hidden_layers=hub["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=kv_channels, hidden_act="silu",
        max_position_embeddings=int(hub.get("max_position_embeddings") or seq_length),
        initializer_range=hub.get("initializer_range", 0.02), rms_norm_eps=hub.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=bool(hub.get("tie_word_embeddings", False)),
        attention_dropout=float(hub.get("attn_dropout_prob") or 0.0),
        rope_parameters=rope_parameters(hub.get("rotary_emb_base", 10000), None, "Qwen"),
        use_sliding_window=False, bos_token_id=hub.get("bos_token_id"), eos_token_id=hub.get("eos_token_id"),
        pad_token_id=hub.get("pad_token_id"), seq_length=seq_length,
        use_dynamic_ntk=bool(hub.get("use_dynamic_ntk", True)), use_logn_attn=bool(hub.get("use_logn_attn", True)))


# ------------------------------------------------------------------ dynamic NTK and log-n attention


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen's NTK factor for an input of ``length`` tokens (1 up to ``seq_length``), as the hub code computes it."""
    context = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context) - 1, 1)


def _sample_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the length of its sample (the last position of its run of consecutive positions, plus one)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = starts.cumsum(-1) - 1  # per row, 0, 1, ... for each run
    last = torch.zeros_like(position_ids).scatter_reduce(1, sample, position_ids, reduce="amax", include_self=False)
    return last.gather(1, sample) + 1


class QwenRotaryEmbedding(Qwen2RotaryEmbedding):
    """Qwen2's RoPE, with Qwen's dynamic NTK base in eval mode where a sample is longer than ``seq_length``.

    A forward pass whose rows all start past position 0 continues a generation (a KV cache): it keeps the NTK
    factor of the pass that started it, as the hub code does."""

    _alpha: torch.Tensor | None = None  # per row, of the last pass that started at position 0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if self.training or not config.use_dynamic_ntk:
            return super().forward(x, position_ids)
        position_ids = position_ids.expand(x.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
        continues = bool((position_ids[:, 0] > 0).all())
        if continues and self._alpha is not None and self._alpha.shape[0] == position_ids.shape[0]:
            alpha = self._alpha[:, None].expand_as(position_ids)
        elif int(position_ids.max()) < config.seq_length:  # no sample longer than seq_length: factor 1
            self._alpha = torch.ones(position_ids.shape[0], dtype=torch.float64, device=position_ids.device)
            return super().forward(x, position_ids)
        else:
            lengths = _sample_lengths(position_ids)
            table = {n: ntk_alpha(n, config.seq_length) for n in lengths.unique().tolist()}
            alpha = torch.tensor([[table[n] for n in row] for row in lengths.tolist()], dtype=torch.float64,
                                 device=position_ids.device)
            self._alpha = alpha[:, -1].clone()
        if bool((alpha == 1).all()):
            return super().forward(x, position_ids)
        dim = self.inv_freq.shape[0] * 2
        base = config.rope_parameters["rope_theta"] * alpha ** (dim / (dim - 2))  # [batch, tokens], float64
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim
        inv_freq = 1.0 / (base.to(torch.float32)[..., None] ** exponents)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def logn_scale(position_ids: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Qwen's log-n query scale per token, ``[batch, 1, tokens, 1]``: ``log(p + 1) / log(seq_length)`` past
    ``seq_length``, 1 before."""
    places = (position_ids + 1).to(torch.float64)
    scale = torch.where(places > seq_length, torch.log(places) / math.log(seq_length), torch.ones_like(places))
    return scale.to(dtype)[:, None, :, None]


class QwenLognAttention(Qwen2Attention):
    """Qwen2's attention with Qwen's log-n scaling of the queries in eval mode (past ``seq_length``)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Any = None, **kwargs: Any):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        position_ids = kwargs.get("position_ids")
        seq_length = self.config.seq_length
        if not self.training and position_ids is not None and int(position_ids.max()) + 1 > seq_length:
            query_states = query_states * logn_scale(position_ids, seq_length, query_states.dtype)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# ------------------------------------------------------------------ the model


class QwenNativeForCausalLM(HubLayoutMixin, Qwen2ForCausalLM):
    """Qwen (1.0) as transformers' Qwen2, with Qwen's dynamic NTK and log-n attention past ``seq_length``."""

    config_class = QwenNativeConfig

    def __init__(self, config: QwenNativeConfig) -> None:
        super().__init__(config)
        if config.use_dynamic_ntk:
            self.model.rotary_emb.__class__ = QwenRotaryEmbedding  # the same buffers; the forward adds the NTK base
        if config.use_logn_attn:
            for layer in self.model.layers:
                layer.self_attn.__class__ = QwenLognAttention


def _mapping() -> list:
    renames = [(r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.ln_f\.", "model.norm."),
               (r"^transformer\.h\.", "model.layers."), (r"\.ln_1\.", ".input_layernorm."),
               (r"\.ln_2\.", ".post_attention_layernorm."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
               (r"\.mlp\.w1\.", ".mlp.up_proj."), (r"\.mlp\.w2\.", ".mlp.gate_proj."),
               (r"\.mlp\.c_proj\.", ".mlp.down_proj.")]
    return hub_mapping(renames, "attn.c_attn", lambda: Chunk(dim=0))


# by class name: the mapping must not reach other Qwen2 classes
register_checkpoint_conversion_mapping(QwenNativeForCausalLM.__name__, _mapping(), overwrite=True)

# the hub's names of linear layers -> the port's (LoRA target_modules written for the hub code)
HUB_LINEAR_NAMES = {"qwen": {"c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"),
                             "w1": ("up_proj",), "w2": ("gate_proj",)}}


def model_class(hub: dict) -> type:
    return QwenNativeForCausalLM


# ------------------------------------------------------------------ the tokenizer

VOCAB_FILE = "qwen.tiktoken"
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # the hub tokenizer's PAT_STR
SPECIAL_START_ID = 151643  # the hub tokenizer's fixed ids of its special tokens
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))


def read_ranks(path: Any) -> dict[bytes, int]:
    """A tiktoken BPE file: one ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for line in fh.read().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the byte-level pre-tokenizer writes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer(ranks: dict[bytes, int]) -> Any:
    """A ``tokenizers`` tokenizer that encodes as tiktoken does with Qwen's ranks, pattern and special tokens.

    tiktoken merges, within each pre-token, the adjacent pair whose union has the lowest rank, and takes a
    pre-token that is a token whole; a byte-level BPE whose merges are every (left, right) split of each token
    into two tokens, ordered by the token's rank, with ``ignore_merges``, does the same."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])):
            merges.append((text(left), text(right)))
    for offset, special in enumerate(SPECIAL_TOKENS):
        vocab[special] = SPECIAL_START_ID + offset
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tokenizer


_BUILT: dict[str, str] = {}  # sha256 of a vocabulary file -> the tokenizer built from it, as JSON (seconds to build)


def _built(vocab: Any) -> Any:
    import hashlib

    from tokenizers import Tokenizer

    key = hashlib.sha256(vocab.read_bytes()).hexdigest()
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = build_tokenizer(read_ranks(vocab)).to_str()
    return Tokenizer.from_str(_BUILT[key])


def load_tokenizer(path: Any, hub: dict, **kwargs: Any) -> Any:
    """Qwen's tiktoken tokenizer (``qwen.tiktoken``) without its remote code, with the original's ids.

    Like ``QWenTokenizer`` it adds no BOS or EOS and has no EOS or pad token unless given one (XTuner's Qwen
    configs pass ``eos_token``); ``<|endoftext|>`` and the others are special wherever they appear in a text."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from lmtune.model.ports import _json_file, _source
    from lmtune.model.ports.layout import _local_file

    config = _json_file(path, "tokenizer_config.json", kwargs) or {}
    vocab = _local_file(_source(path, kwargs), VOCAB_FILE)
    if vocab is None:
        raise ConfigError(f"{path}: no {VOCAB_FILE} (the Qwen tokenizer's vocabulary)")
    for key in ("model_max_length", "padding_side", "eos_token", "pad_token", "bos_token", "unk_token"):
        if config.get(key) is not None:
            kwargs.setdefault(key, config[key])
    for key in ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies",
                "use_fast", "trust_remote_code"):
        kwargs.pop(key, None)
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    tokenizer = TokenizersBackend(tokenizer_object=_built(vocab), **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer
