"""ChatGLM2-6B and ChatGLM3-6B (model_type ``chatglm``) on transformers' GLM implementation.

The hub code's GLM blocks are what transformers' ``GlmForCausalLM`` computes: RMSNorm before attention
and MLP, grouped-query attention with biased q/k/v projections and an unbiased output projection,
rotary embeddings on the first half of each head's channels with interleaved pairs
(``partial_rotary_factor`` 0.5), a SwiGLU MLP whose fused ``dense_h_to_4h`` holds the gate (the half
that goes through SiLU) first and the up projection second (transformers' ``gate_up_proj``, the same
order), a final RMSNorm and an untied head. The weights load as the hub stores them:

- ``transformer.embedding.word_embeddings`` -> ``model.embed_tokens``, ``transformer.encoder.layers``
  -> ``model.layers``, ``transformer.encoder.final_layernorm`` -> ``model.norm``,
  ``transformer.output_layer`` -> ``lm_head``, ``self_attention.dense`` -> ``self_attn.o_proj``,
  ``mlp.dense_h_to_4h`` / ``dense_4h_to_h`` -> ``mlp.gate_up_proj`` / ``down_proj``;
- ``self_attention.query_key_value`` (weight and bias) is split into q, k and v: with multi-query
  attention (every release) its rows are all query heads, then the ``multi_query_group_num`` key heads,
  then as many value heads (``QKVSizesSplit``); without it they run head by head, each head's query, key
  and value in turn (``GroupedQKVSplit`` with one query head per group). Saving fuses them again;
- ``transformer.rotary_pos_emb.inv_freq``, a buffer the hub checkpoints store, is ignored on load and
  not written on save: the hub code computes it when it builds the model and uses only its dtype and
  device (its rotary table is recomputed from ``seq_length`` on every forward).

``rope_ratio`` (ChatGLM3-6B-32K: 50) multiplies the rotary base, as ChatGLM3's code does (and
transformers' GLM conversion). ChatGLM2-6B-32K's code used the same key to divide the positions instead
(position interpolation); such a checkpoint (a config.json naming chatglm2 with ``rope_ratio`` != 1) is
refused rather than run with the wrong positions.

Not reproduced, none of which changes fp32 results: the hub RMSNorm multiplies its weight in fp32 before
casting back (transformers casts first: a rounding difference in bf16/fp16); ChatGLM2's code computes the
rotary angles in the model's dtype (in fp16 or bf16 they are rounded, and positions above 2048 or 256
with them), transformers computes them in fp32 as ChatGLM3's code does; ``hidden_dropout`` (0 in every
release) is not applied. Refused with a ``ConfigError``: P-tuning prefixes (``pre_seq_len``), the hub's
own int4/int8 quantization (``quantization_bit``), LayerNorm blocks (``rmsnorm: false``), biased output
and MLP projections (``add_bias_linear``), ``apply_residual_connection_post_layernorm``, no final norm
(``post_layer_norm: false``) and ``fp32_residual_connection``: no release uses them.

The tokenizer (``load_tokenizer``) is the hub's ``ChatGLMTokenizer`` rebuilt by transformers' tokenizers
backend from the same ``tokenizer.model``, ChatGLM3's or ChatGLM2's as the repository's tokenizer code says
(see ``load_tokenizer``). Like the original, it matches none of ChatGLM3's role tokens (``<|user|>``...) in
a text unless it is loaded with ``encode_special_tokens=True``: a prompt template that writes them as text
gets them as ordinary pieces, as the hub tokenizer (and XTuner with it) does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import GlmConfig, GlmForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.ops import GroupedQKVSplit, hub_mapping

ROPE_BASE = 10000.0  # fixed in the hub code; rope_ratio multiplies it

# the special tokens ChatGLMTokenizer appends after the SentencePiece vocabulary, in order
MASK_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # ChatGLM3 only
PREFIX = ("[gMASK]", "sop")  # what build_inputs_with_special_tokens puts before every encoding


class ChatGLMNativeConfig(GlmConfig):
    model_type = "chatglm"


class ChatGLMNativeForCausalLM(HubLayoutMixin, GlmForCausalLM):
    """ChatGLM2 / ChatGLM3: transformers' GLM with the hub's weight names on load and save."""

    config_class = ChatGLMNativeConfig
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]

    def __init__(self, config: ChatGLMNativeConfig) -> None:
        super().__init__(config)
        # the hub's embedding has no padding row: the pad token's row (id 0, <unk>) is trained like any other
        self.model.embed_tokens.padding_idx = None

    def hub_config_updates(self) -> dict[str, Any]:
        return {"padded_vocab_size": self.config.vocab_size}  # the hub config's name of the vocabulary size


# ------------------------------------------------------------------ weights

class QKVSizesSplit(ConversionOps):
    """ChatGLM's multi-query ``query_key_value`` <-> q, k, v: rows ``[q (heads x D); k (groups x D);
    v (groups x D)]``, sizes read from the config (not from the target parameters, which a quantized model
    holds packed). ``inverse=True`` concatenates q, k, v back (the op run on save)."""

    def __init__(self, inverse: bool = False) -> None:
        self.inverse = inverse

    @staticmethod
    def _sizes(config) -> list[int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads
        return [config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        if not self.inverse:
            value = next(iter(input_dict.values()))
            fused = value[0] if isinstance(value, list) else value
            parts = torch.split(fused, self._sizes(config), dim=0)
            return {t: p.contiguous() for t, p in zip(target_patterns, parts)}
        parts = []
        for pattern in source_patterns:
            value = input_dict.pop(pattern)
            parts.append(value[0] if isinstance(value, list) else value)
        return {target_patterns[0]: torch.cat(parts, dim=0).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return QKVSizesSplit(inverse=not self.inverse)


class ChatGLMMHANativeForCausalLM(ChatGLMNativeForCausalLM):
    """A ChatGLM config.json without multi-query attention: its ``query_key_value`` runs head by head."""


def _mapping(grouped_by_head: bool) -> list:
    renames = [(r"^transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
               (r"^transformer\.encoder\.layers\.", "model.layers."),
               (r"^transformer\.encoder\.final_layernorm\.", "model.norm."),
               (r"^transformer\.output_layer\.", "lm_head."),
               (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
               (r"\.mlp\.dense_h_to_4h\.", ".mlp.gate_up_proj."),
               (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")]
    return hub_mapping(renames, "self_attention.query_key_value", GroupedQKVSplit if grouped_by_head else QKVSizesSplit)


# by class name: the mapping must not reach the hub's own ChatGLM classes (model_type "chatglm" too)
register_checkpoint_conversion_mapping(ChatGLMNativeForCausalLM.__name__, _mapping(False), overwrite=True)
register_checkpoint_conversion_mapping(ChatGLMMHANativeForCausalLM.__name__, _mapping(True), overwrite=True)

# the hub's names of linear layers -> the port's (LoRA target_modules written for the hub code)
HUB_LINEAR_NAMES = {"chatglm": {"query_key_value": ("q_proj", "k_proj", "v_proj"), "dense": ("o_proj",),
                                "dense_h_to_4h": ("gate_up_proj",), "dense_4h_to_h": ("down_proj",),
                                "output_layer": ("lm_head",)}}


# ------------------------------------------------------------------ config

_REFUSED = (  # key, the value every release has, what lmtune's port would get wrong otherwise
    ("rmsnorm", True, "LayerNorm blocks"),
    ("post_layer_norm", True, "a model without the final norm"),
    ("apply_residual_connection_post_layernorm", False, "residuals taken after the norms"),
    ("add_bias_linear", False, "biased output and MLP projections"),
    ("fp32_residual_connection", False, "an fp32 residual stream"),
)


def _multi_query(hub: dict) -> bool:
    return bool(hub.get("multi_query_attention", False))


def native_config(hub: dict) -> ChatGLMNativeConfig:
    required = ("padded_vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads")
    missing = [k for k in required if k not in hub]
    if missing:
        raise ConfigError(f"ChatGLM config.json lacks {', '.join(missing)}: is it a ChatGLM2/ChatGLM3 checkpoint? "
                          "(ChatGLM-6B, the first version, is a different architecture that lmtune does not port)")
    for key, expected, what in _REFUSED:
        if key in hub and hub[key] is not None and bool(hub[key]) != expected:
            raise ConfigError(f"ChatGLM config.json has {key}={hub[key]!r} ({what}): lmtune's ChatGLM port "
                              f"(transformers' GLM) covers the released ChatGLM2/3 architecture, {key}={expected}")
    if hub.get("pre_seq_len"):
        raise ConfigError(f"ChatGLM config.json has pre_seq_len={hub['pre_seq_len']} (a P-tuning v2 prefix encoder): "
                          "lmtune's ChatGLM port does not run prefix tuning; use the base model's config.json")
    if hub.get("quantization_bit"):
        raise ConfigError(f"ChatGLM config.json has quantization_bit={hub['quantization_bit']}: the hub code's own "
                          "int4/int8 weights (chatglm*-int4) are not ported; use the full-precision checkpoint "
                          "(lmtune quantizes with bitsandbytes through quantization_config)")
    ratio = float(hub.get("rope_ratio") or 1.0)
    if ratio != 1.0 and "chatglm2" in str(hub.get("_name_or_path", "")).lower():
        raise ConfigError(f"ChatGLM2 config.json with rope_ratio={hub['rope_ratio']}: ChatGLM2-6B-32K's code divides "
                          "the positions by rope_ratio, ChatGLM3's multiplies the rotary base by it; lmtune's port "
                          "implements ChatGLM3's rule only")
    if float(hub.get("hidden_dropout") or 0.0):
        from lmtune.core.device import warn_once

        warn_once(f"ChatGLM config.json has hidden_dropout={hub['hidden_dropout']}: lmtune's port (transformers' "
                  "GLM) applies no dropout to the residual branches")
    heads = int(hub["num_attention_heads"])
    head_dim = int(hub.get("kv_channels") or int(hub["hidden_size"]) // heads)
    kv_heads = int(hub.get("multi_query_group_num") or 1) if _multi_query(hub) else heads
    if heads % kv_heads:
        raise ConfigError(f"ChatGLM config.json: num_attention_heads={heads} is not a multiple of "
                          f"multi_query_group_num={kv_heads}")
    return ChatGLMNativeConfig(
        vocab_size=int(hub["padded_vocab_size"]), hidden_size=int(hub["hidden_size"]),
        intermediate_size=int(hub["ffn_hidden_size"]), num_hidden_layers=int(hub["num_layers"]),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
        attention_dropout=float(hub.get("attention_dropout") or 0.0),
        max_position_embeddings=int(hub.get("seq_length") or 2048),
        initializer_range=float(hub.get("initializer_range", 0.02)),
        rms_norm_eps=float(hub.get("layernorm_epsilon", 1e-5)), use_cache=bool(hub.get("use_cache", True)),
        tie_word_embeddings=bool(hub.get("tie_word_embeddings", False)),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE * ratio, "partial_rotary_factor": 0.5},
        attention_bias=bool(hub.get("add_qkv_bias", False)),
        pad_token_id=hub.get("pad_token_id", 0), eos_token_id=hub.get("eos_token_id", 2),
        bos_token_id=hub.get("bos_token_id"))


def model_class(hub: dict) -> type:
    return ChatGLMNativeForCausalLM if _multi_query(hub) else ChatGLMMHANativeForCausalLM


# ------------------------------------------------------------------ tokenizer

def _tokenizer_code(path: Any, kwargs: dict) -> str | None:
    """The text (never run) of the repository's ``tokenization_chatglm.py``, or None without one."""
    from lmtune.model.ports import _source
    from lmtune.model.ports.layout import _local_file

    found = _local_file(_source(path, kwargs), "tokenization_chatglm.py")
    return None if found is None else found.read_text(encoding="utf-8", errors="replace")


def tokenizer_flavour(code: str | None) -> tuple[bool, tuple[str, ...]]:
    """Which ``ChatGLMTokenizer`` a repository's code is: whether it has ChatGLM3's role tokens, and which of its
    appended tokens ``encode_special_tokens=True`` matches in a text.

    ChatGLM2's and ChatGLM3's repositories read the same ``tokenizer.model`` with the same config files; only
    their code tells them apart: ChatGLM3's names ``<|observation|>``. ChatGLM3's code of November-December 2023
    matches the four role tokens (``re.escape(token) for token in role_special_tokens``); its later code (2024,
    "for apply_chat_template") all nine appended tokens (``... for token in special_tokens``). Without a code
    file: the later ChatGLM3 code."""
    if code is None:
        return True, MASK_TOKENS + ROLE_TOKENS
    if "<|observation|>" not in code:
        return False, ()
    every = re.search(r"re\.escape\(token\)\s+for\s+token\s+in\s+special_tokens\b", code) is not None
    return True, MASK_TOKENS + ROLE_TOKENS if every else ROLE_TOKENS


def load_tokenizer(path: Any, hub: dict, **kwargs: Any) -> Any:
    """The hub's ``ChatGLMTokenizer`` without its code, with its ids.

    What the original does (ChatGLM2's and ChatGLM3's tokenization_chatglm.py, as transformers 4 runs them):
    the whole text goes through SentencePiece as it is (none of its control or special strings, ``</s>``,
    ``<unk>``, ``[gMASK]``, ``<|user|>``..., is matched in the text); every encoding starts with ``[gMASK]
    sop`` (a pair: ``[gMASK] sop A B </s>``); after the SentencePiece vocabulary come ``[MASK] [gMASK] [sMASK]
    sop eop`` and, for ChatGLM3, ``<|system|> <|user|> <|assistant|> <|observation|>``; EOS ``</s>``, pad and
    unk ``<unk>`` (id 0), no BOS; padding on the left by default. ChatGLM3's ``encode_special_tokens=True``
    (a tokenizer argument, or a tokenizer_config.json key) matches the role tokens in the text (the 2024
    code: all nine appended tokens; see ``tokenizer_flavour``), the text between them encoded on its own.

    lmtune builds this with transformers' tokenizers backend from ``tokenizer.model``: the appended tokens
    are added with the same ids and marked special (so ``decode(..., skip_special_tokens=True)`` drops
    them, where the original writes ``[gMASK]sop`` into the text), and ``split_special_tokens`` keeps every
    special token from being matched in the text, as the original does; with ``encode_special_tokens`` the
    tokens the original matches are added as plain tokens instead (matched in the text, kept by ``decode``,
    as the original keeps them). The original's ``position_ids`` output is not produced (the model computes
    the positions itself) and either padding side works (the original refuses right padding).
    """
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from lmtune.model.ports import _json_file

    config = _json_file(path, "tokenizer_config.json", kwargs) or {}
    roles, matchable = tokenizer_flavour(_tokenizer_code(path, kwargs))
    encode_special = bool(kwargs.pop("encode_special_tokens", config.get("encode_special_tokens", False)))
    if encode_special and not roles:
        raise ConfigError(f"{path}: encode_special_tokens is ChatGLM3's tokenizer option; this is ChatGLM2's "
                          "tokenizer, which has no such option")
    matched = set(matchable) if encode_special else set()
    kwargs.setdefault("padding_side", config.get("padding_side", "left"))
    kwargs.setdefault("clean_up_tokenization_spaces", bool(config.get("clean_up_tokenization_spaces", False)))
    tokenizer = TokenizersBackend.from_pretrained(path, bos_token=None, eos_token="</s>", unk_token="<unk>",
                                                  pad_token="<unk>", split_special_tokens=True, **kwargs)
    backend = tokenizer._tokenizer
    base = backend.get_vocab_size(with_added_tokens=False)
    names = MASK_TOKENS + (ROLE_TOKENS if roles else ())
    for index, name in enumerate(names):
        if backend.token_to_id(name) is not None and backend.token_to_id(name) != base + index:
            raise ConfigError(f"{path}: tokenizer.model already has a piece {name!r}: not ChatGLM's vocabulary")
        special = name not in matched
        token = AddedToken(name, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        added = backend.add_special_tokens([token]) if special else backend.add_tokens([token])
        if added != 1 or backend.token_to_id(name) != base + index:
            raise ConfigError(f"{path}: could not give {name!r} ChatGLM's id {base + index}")
    gmask, sop = (backend.token_to_id(t) for t in PREFIX)
    backend.post_processor = TemplateProcessing(
        single="[gMASK]:0 sop:0 $A:0", pair="[gMASK]:0 sop:0 $A:0 $B:1 </s>:1",
        special_tokens=[("[gMASK]", gmask), ("sop", sop), ("</s>", backend.token_to_id("</s>"))])
    specials = [n for n in names if n not in matched]
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=True)
    tokenizer.split_special_tokens = True
    tokenizer.chatglm_encode_special_tokens = encode_special
    return tokenizer


def prefix_ids(tokenizer: Any) -> list[int]:
    """The ids ChatGLM's tokenizer puts before every encoding (``[gMASK] sop``)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in PREFIX]


__all__ = ["ChatGLMNativeConfig", "ChatGLMNativeForCausalLM", "ChatGLMMHANativeForCausalLM", "HUB_LINEAR_NAMES",
           "QKVSizesSplit", "load_tokenizer", "model_class", "native_config", "prefix_ids", "tokenizer_flavour"]
