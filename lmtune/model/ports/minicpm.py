"""MiniCPM (1 / 2, model_type "minicpm") and MiniCPM3 ("minicpm3") on transformers' own implementations.

Both keep Llama's weight names, RMSNorm and SwiGLU MLP, and add MiniCPM's muP scalings, read from
config.json: the embeddings are multiplied by ``scale_emb``, each residual branch (attention and MLP)
by ``scale_depth / sqrt(num_hidden_layers)``, and the head runs on ``hidden / (hidden_size /
dim_model_base)``. The hub config classes tie the head to the embeddings unless config.json says
``"tie_word_embeddings": false`` (MiniCPM-2B's has no such key: tied).

- MiniCPM runs as transformers' ``GraniteForCausalLM`` (Llama blocks with ``embedding_multiplier`` =
  ``scale_emb``, ``residual_multiplier`` = ``scale_depth / sqrt(layers)``, ``attention_multiplier`` =
  ``1 / sqrt(head_dim)``). Granite divides the head's *output* by ``logits_scaling``, a step lmtune's
  chunked loss recognises only for Granite's own model type; MiniCPM divides the head's *input*, so the
  port's head does that itself (``ScaledInputHead``, the same parameter) and ``logits_scaling`` stays 1.
- MiniCPM3 (multi-head latent attention) is transformers' own ``MiniCPM3ForCausalLM``, whose weight names
  are the hub's (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
  ``kv_b_proj``, ``o_proj``): no renaming. transformers would load a hub MiniCPM3 directory with its own
  class already when ``trust_remote_code`` is false; the port makes ``trust_remote_code=True`` do the same
  (no remote code runs), writes exports in the hub layout, and loads the tokenizer without its code. The
  hub code's value heads are ``hidden_size / num_attention_heads`` wide whatever config.json's ``v_head_dim``
  says, and so are the port's.

RoPE, as the hub code reads ``rope_scaling`` (``type`` or ``rope_type``): none; ``linear``; ``dynamic`` (NTK,
past ``max_position_embeddings``); ``longrope`` (MiniCPM3-4B; the later MiniCPM-1B / MiniCPM4 revisions of
the MiniCPM code have the same class). The hub's LongRoPE builds its cos/sin cache at
``max_position_embeddings`` on creation, so when that exceeds ``original_max_position_embeddings`` it uses
the long factors at every length, and it scales cos/sin by ``sqrt(1 + log(max / original) / log(original))``
(also below 1); the port gives transformers' ``longrope`` those factors and that attention factor.

Not reproduced: after a sequence longer than ``max_position_embeddings``, the hub's dynamic-NTK embedding keeps
the enlarged base for later shorter inputs; transformers recomputes it per call (the same for any one input).
In bf16 the hub code computes the rotary embedding in fp32 and casts back; transformers rotates in the input
dtype (the same in fp32). Variants that stop with a ``ConfigError``: ``pretraining_tp`` > 1 (the hub code
then skips the logit scaling), MiniCPM-MoE (``num_experts``), MiniCPM4's sparse attention (``sparse_config``),
MiniCPM3 without ``q_lora_rank`` or with ``attention_bias``, other RoPE types.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GraniteConfig, GraniteForCausalLM, MiniCPM3Config, MiniCPM3ForCausalLM

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.llama_like import llama_kwargs

ROPE_TYPES = ("linear", "dynamic", "longrope")


@strict
class MiniCPMNativeConfig(GraniteConfig):
    """``GraniteConfig`` for MiniCPM: its multipliers from MiniCPM's keys; ``head_input_divisor`` for the head."""

    model_type = "minicpm"

    head_input_divisor: float | int = 1.0  # hidden_size / dim_model_base


class MiniCPM3NativeConfig(MiniCPM3Config):
    model_type = "minicpm3"


# ------------------------------------------------------------------ the head

class ScaledInputHead(nn.Linear):
    """MiniCPM's output head: ``linear(h / divisor)``, ``divisor = hidden_size / dim_model_base``.

    Only the forward differs from ``nn.Linear`` (the same weight, tied or not); lmtune's chunked loss runs it
    as a module."""

    input_divisor: float = 1.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states / self.input_divisor, self.weight, self.bias)


class _HubLayout(HubLayoutMixin):
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class MiniCPMNativeForCausalLM(_HubLayout, GraniteForCausalLM):
    """MiniCPM 1 / 2: Granite's model with MiniCPM's scalings and ``ScaledInputHead``."""

    config_class = MiniCPMNativeConfig

    def __init__(self, config: MiniCPMNativeConfig) -> None:
        super().__init__(config)
        self._scale_head(self.lm_head)

    def _scale_head(self, head: nn.Module) -> None:
        if type(head) is nn.Linear:
            head.__class__ = ScaledInputHead
        head.input_divisor = float(self.config.head_input_divisor)

    def _get_resized_lm_head(self, old_lm_head: nn.Linear, *args: Any, **kwargs: Any) -> nn.Linear:
        new_lm_head = super()._get_resized_lm_head(old_lm_head, *args, **kwargs)
        self._scale_head(new_lm_head)
        return new_lm_head


class MiniCPM3NativeForCausalLM(_HubLayout, MiniCPM3ForCausalLM):
    """MiniCPM3: transformers' implementation, saved in the hub layout."""

    config_class = MiniCPM3NativeConfig


# the hub's names of linear layers are the port's (LoRA target_modules written for the hub code work as they are)
HUB_LINEAR_NAMES: dict[str, dict[str, tuple[str, ...]]] = {"minicpm": {}, "minicpm3": {}}


# ------------------------------------------------------------------ configs

def rope_parameters(hub: dict, head_dim: int, family: str) -> dict:
    """transformers' ``rope_parameters`` that reproduce the hub code's rotary embedding."""
    theta = float(hub.get("rope_theta", 10000.0))
    scaling = hub.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{family} config.json: rope_scaling must be a dict, got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{family} config.json: rope_scaling type {kind!r} is not one the {family} code knows "
                          f"({', '.join(ROPE_TYPES)})")
    if kind in ("linear", "dynamic"):
        if "factor" not in scaling:
            raise ConfigError(f"{family} config.json: rope_scaling {kind!r} needs a factor")
        return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}
    missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings") if k not in scaling]
    if missing:
        raise ConfigError(f"{family} config.json: longrope rope_scaling lacks {', '.join(missing)}")
    short, long = [float(x) for x in scaling["short_factor"]], [float(x) for x in scaling["long_factor"]]
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise ConfigError(f"{family} config.json: longrope factors must have {head_dim // 2} entries (half the "
                          f"rotary width {head_dim}), got {len(short)} and {len(long)}")
    original = int(scaling["original_max_position_embeddings"])
    longest = int(hub.get("max_position_embeddings", original))
    if longest > original:
        short = long  # the hub's cache, built at max_position_embeddings, holds the long factors at every length
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original,
            "attention_factor": math.sqrt(1 + math.log(longest / original) / math.log(original))}


def _muP(hub: dict) -> tuple[float, float, float]:
    layers = int(hub["num_hidden_layers"])
    scale_emb = float(hub.get("scale_emb", 1))
    residual = float(hub.get("scale_depth", 1)) / math.sqrt(layers)
    head_divisor = float(hub["hidden_size"]) / float(hub.get("dim_model_base", 1))
    return scale_emb, residual, head_divisor


def _check_common(hub: dict, family: str) -> None:
    if int(hub.get("pretraining_tp", 1) or 1) > 1:
        raise ConfigError(f"{family} config.json has pretraining_tp={hub['pretraining_tp']}: the {family} code then "
                          "computes unscaled logits, which lmtune does not reproduce; set it to 1")


def native_config(hub: dict) -> GraniteConfig | MiniCPM3Config:
    kind = hub.get("model_type")
    family = "MiniCPM3" if kind == "minicpm3" else "MiniCPM"
    llama = llama_kwargs({k: v for k, v in hub.items() if k not in ("rope_scaling", "head_dim")}, family,
                         tie_word_embeddings=bool(hub.get("tie_word_embeddings", True)))
    _check_common(hub, family)
    scale_emb, residual, head_divisor = _muP(hub)
    if kind == "minicpm3":
        if hub.get("q_lora_rank") is None:
            raise ConfigError("MiniCPM3 config.json has no q_lora_rank: the MiniCPM3 code always factors the query "
                              "projection (q_a_proj, q_b_proj)")
        if hub.get("attention_bias"):
            raise ConfigError("MiniCPM3 config.json has attention_bias=true, which no released MiniCPM3 uses and "
                              "lmtune's port does not cover")
        rope_dim = int(hub.get("qk_rope_head_dim", 32))
        kwargs = {k: v for k, v in llama.items() if k not in ("head_dim",)}
        kwargs["rope_parameters"] = rope_parameters(hub, rope_dim, family)
        return MiniCPM3NativeConfig(
            **kwargs, qk_nope_head_dim=int(hub.get("qk_nope_head_dim", 64)), qk_rope_head_dim=rope_dim,
            q_lora_rank=int(hub["q_lora_rank"]), kv_lora_rank=int(hub.get("kv_lora_rank", 256)),
            v_head_dim=int(hub["hidden_size"]) // int(hub["num_attention_heads"]), attention_bias=False,
            attention_dropout=float(hub.get("attention_dropout", 0.0)), scale_emb=scale_emb,
            scale_depth=float(hub.get("scale_depth", 1)), dim_model_base=hub.get("dim_model_base", 1))
    for key, what in (("num_experts", "MiniCPM-MoE's mixture of experts"), ("sparse_config", "MiniCPM4's sparse "
                                                                                            "attention")):
        if hub.get(key):
            raise ConfigError(f"MiniCPM config.json has {key}: {what} is not covered by lmtune's MiniCPM port")
    head_dim = int(hub["hidden_size"]) // int(hub["num_attention_heads"])
    if head_dim * int(hub["num_attention_heads"]) != int(hub["hidden_size"]):
        raise ConfigError("MiniCPM config.json: hidden_size must be a multiple of num_attention_heads")
    llama["rope_parameters"] = rope_parameters(hub, head_dim, family)
    llama.pop("head_dim", None)
    return MiniCPMNativeConfig(
        **llama, attention_bias=bool(hub.get("attention_bias", False)), mlp_bias=False,
        attention_dropout=float(hub.get("attention_dropout", 0.0)), embedding_multiplier=scale_emb,
        residual_multiplier=residual, attention_multiplier=1.0 / math.sqrt(head_dim), logits_scaling=1.0,
        head_input_divisor=head_divisor)


def model_class(hub: dict) -> type:
    return MiniCPM3NativeForCausalLM if hub.get("model_type") == "minicpm3" else MiniCPMNativeForCausalLM


# ------------------------------------------------------------------ tokenizers

def load_tokenizer(path: Any, hub: dict, **kwargs: Any) -> Any:
    """MiniCPM's tokenizer (a Llama-style SentencePiece BPE; MiniCPM3's ``MiniCPMTokenizer`` is
    ``LlamaTokenizerFast`` plus tool-call helpers for its chat template), built by transformers' backend from
    ``tokenizer.json`` or ``tokenizer.model``, with the original's BOS/EOS rule: Llama's tokenizers add BOS unless
    tokenizer_config.json says ``add_bos_token: false`` (MiniCPM3's does), and no EOS unless it says otherwise."""
    from lmtune.model.ports import llama_rule_tokenizer

    return llama_rule_tokenizer(path, **kwargs)


__all__ = ["HUB_LINEAR_NAMES", "MiniCPM3NativeConfig", "MiniCPM3NativeForCausalLM",
           "MiniCPMNativeConfig", "MiniCPMNativeForCausalLM", "ScaledInputHead", "load_tokenizer", "model_class",
           "native_config"]
