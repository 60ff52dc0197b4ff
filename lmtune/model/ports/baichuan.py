"""Baichuan (7B, 13B) and Baichuan2 (7B, 13B) on transformers' Llama implementation.

The hub checkpoints are Llama with a fused, unpermuted ``self_attn.W_pack`` ([q; k; v] rows, split
with ``Chunk``) and otherwise Llama's weight names. Multi-head attention only (no key/value head
key), no biases, RMSNorm, SwiGLU. What differs between the variants, as their config.json says it:

- position encoding: the 7B models (config.json with ``max_position_embeddings``) use RoPE with the
  base fixed at 10000; the 13B models (no ``max_position_embeddings``, ``model_max_length`` instead)
  use ALiBi, a per-head bias ``-slope * (query position - key position)`` added to the attention
  scores, with Baichuan's slopes (``alibi_slopes``). lmtune computes the bias from the position ids,
  and masks it across the samples of a packed row, so packed samples stay apart as on Llama;
- output head: Baichuan2's code normalises each row of the head's weight on every forward
  (``logits = h @ normalize(W).T``, the stored weight being the raw one), Baichuan's does not. The
  Baichuan2 code does so whatever the vocabulary; in a config.json the two differ only by the size of
  the vocabulary, 125,696 for every Baichuan2 release (64,000 for Baichuan), which is how lmtune (like
  vLLM) tells them apart. A ``norm_head`` key in config.json (lmtune's, which the hub code ignores)
  says it outright: lmtune writes it on export whenever the vocabulary no longer tells (after
  ``resize_token_embeddings``), and the test fixtures use it for their tiny vocabularies.

Not reproduced: Baichuan2's ``z_loss_weight`` (a training-only ``z * mean(max_logit**2)`` term, 0 in
the released configs): lmtune's loss is the plain cross-entropy, and a checkpoint asking for a
non-zero weight loads with a warning. The hub code's eval-mode head rewrites its stored weight with
the normalised one on the first call; lmtune normalises on every call and never changes the weight
(the same logits).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.llama_like import llama_kwargs, rope_parameters

BAICHUAN2_VOCAB = 125696  # the vocabulary of every Baichuan2 release
ROPE_BASE = 10000.0  # fixed in the hub code (no rope_theta key)
NORM_HEAD_KEY = "norm_head"


@strict
class BaichuanNativeConfig(LlamaConfig):
    """``LlamaConfig`` plus what Baichuan adds: ALiBi instead of RoPE, the normalised head, the z-loss."""

    model_type = "baichuan"

    position_embedding: str = "rope"  # "rope" (7B) or "alibi" (13B)
    norm_head: bool = False  # Baichuan2's normalised output head
    z_loss_weight: float = 0.0  # kept for the record; lmtune's loss does not apply it


def uses_norm_head(hub: dict) -> bool:
    """Whether a Baichuan config.json is Baichuan2's (normalised head): its ``norm_head`` key where it has
    one, else whether its vocabulary is Baichuan2's."""
    if isinstance(hub.get(NORM_HEAD_KEY), bool):
        return hub[NORM_HEAD_KEY]
    return int(hub.get("vocab_size", 0)) == BAICHUAN2_VOCAB


def uses_alibi(hub: dict) -> bool:
    """Whether a Baichuan config.json is a 13B one (ALiBi): the 13B configs have no ``max_position_embeddings``
    (their length is ``model_max_length``), the 7B ones (RoPE) have it."""
    return "max_position_embeddings" not in hub


def alibi_slopes(heads: int) -> list[float]:
    """Baichuan's ALiBi slopes: for ``n`` a power of two ``s, s**2, ..., s**n`` with ``s = 2**(-8/n)``; otherwise
    those of the largest power of two ``c < n``, then every other slope of ``2c`` heads for the remaining heads."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


# ------------------------------------------------------------------ the normalised head

class NormHead(nn.Linear):
    """Baichuan2's output head: ``h @ normalize(W).T``, each vocabulary row of the weight scaled to unit L2
    norm on every call; the parameter holds the raw weight (trained, and saved, as the hub code does).

    ``effective_weight()`` is the matrix the head multiplies by, for code that uses a head's weight
    directly (lmtune's chunked loss)."""

    def effective_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, p=2.0, dim=1, eps=1e-12)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.effective_weight(), self.bias)


# ------------------------------------------------------------------ ALiBi attention

class _BiasMemo:
    """The additive mask of the last forward pass, shared by every layer of a model: each layer gets the same
    position ids and mask, so one tensor serves them all (and the backward pass keeps one copy, not one per
    layer). Held through weak references only: it lives as long as the forward pass and its graph use it."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._refs: tuple = ()

    def get(self, key: tuple, sources: tuple) -> torch.Tensor | None:
        if key != self._key or len(sources) != len(self._refs) - 1:
            return None
        alive = [ref() for ref in self._refs]
        if any(a is None for a in alive) or any(a is not s for a, s in zip(alive[1:], sources)):
            return None
        return alive[0]

    def put(self, key: tuple, sources: tuple, bias: torch.Tensor) -> None:
        self._key = key
        self._refs = (weakref.ref(bias), *(weakref.ref(s) for s in sources))


def _sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which sample of its row each token belongs to: a new one wherever the position does not follow the one
    before (packed rows restart their positions at each sample)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(-1)


@torch.compiler.disable
def alibi_mask(slopes: list[float], query: torch.Tensor, kv_length: int, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, memo: _BiasMemo | None = None) -> torch.Tensor:
    """The additive attention mask of an ALiBi layer, ``[batch, heads, queries, keys]`` in the query's dtype:
    ``-slope * (query position - key position)`` where the query may attend to the key, the dtype's minimum
    elsewhere.

    Which keys a query may see is what transformers' mask says (causality, the samples of a packed row,
    padding), a 4-D boolean or additive mask; without one (plain causal attention), the causal pattern,
    with the samples of packed rows kept apart. The distances are those of the position ids when the keys
    are the queries' own tokens (no cache), else of the tokens' places in the cache; within a sample the
    two are the same.
    """
    batch, heads, q_length, _ = query.shape
    device, dtype = query.device, query.dtype
    offset = kv_length - q_length
    positions = None
    if position_ids is not None and offset == 0 and position_ids.shape[-1] == q_length:
        positions = position_ids.to(device).expand(batch, -1)
    key = (batch, heads, q_length, kv_length, dtype, device, tuple(slopes))
    sources = tuple(t for t in (attention_mask, position_ids) if t is not None)
    if memo is not None:
        found = memo.get(key, sources)
        if found is not None:
            return found
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask[..., -kv_length:]
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    else:
        q_places = torch.arange(q_length, device=device) + offset
        allowed = (torch.arange(kv_length, device=device)[None, :] <= q_places[:, None])[None, None]
        if positions is not None:
            sample = _sample_ids(positions)
            allowed = allowed & (sample[:, None, :, None] == sample[:, None, None, :])
        if attention_mask is not None:  # a 2-D padding mask over the keys
            allowed = allowed & attention_mask[:, None, None, -kv_length:].to(device=device, dtype=torch.bool)
    if positions is not None:
        distance = (positions[:, :, None] - positions[:, None, :]).float()[:, None]
    else:
        q_places = torch.arange(q_length, device=device) + offset
        distance = (q_places[:, None] - torch.arange(kv_length, device=device)[None, :]).float()[None, None]
    slope = torch.tensor(slopes, dtype=torch.float32, device=device)[None, :, None, None]
    bias = torch.where(allowed, (-slope * distance).to(dtype), torch.finfo(dtype).min)
    bias = bias.expand(batch, heads, q_length, kv_length)
    if memo is not None:
        memo.put(key, sources, bias)
    return bias


class BaichuanAlibiAttention(LlamaAttention):
    """Llama's attention without rotary embeddings and with Baichuan's ALiBi bias (13B models).

    It runs transformers' own eager or sdpa attention function with the bias as the additive mask
    (sdpa for every other implementation asked for: a per-head bias needs a materialised mask)."""

    alibi_slopes: list[float]
    alibi_memo: _BiasMemo | None = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        bias = alibi_mask(self.alibi_slopes, query_states, key_states.shape[2], attention_mask,
                          kwargs.get("position_ids"), self.alibi_memo)
        attend = eager_attention_forward if self.config._attn_implementation == "eager" else sdpa_attention_forward
        kwargs = {k: v for k, v in kwargs.items() if k in ("output_attentions",)}
        attn_output, attn_weights = attend(self, query_states, key_states, value_states, bias,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class _NoRotary(nn.Module):
    """In place of the rotary embedding of an ALiBi model: nothing to compute."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> tuple[None, None]:
        return None, None


# ------------------------------------------------------------------ the models

class _BaichuanMixin(HubLayoutMixin):
    """What both Baichuan models add to ``LlamaForCausalLM``: the normalised head of Baichuan2 (kept through
    ``resize_token_embeddings``) and the config keys an export updates."""

    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # a buffer some Baichuan checkpoints store

    def _use_norm_head(self) -> None:
        if getattr(self.config, "norm_head", False):
            # the same parameter, the hub's normalisation on top (NormHead only overrides the forward)
            self.lm_head.__class__ = NormHead

    def _get_resized_lm_head(self, old_lm_head: nn.Linear, *args: Any, **kwargs: Any) -> nn.Linear:
        new_lm_head = super()._get_resized_lm_head(old_lm_head, *args, **kwargs)
        if isinstance(old_lm_head, NormHead) and type(new_lm_head) is nn.Linear:
            new_lm_head.__class__ = NormHead
        return new_lm_head

    def hub_config_updates(self) -> dict[str, Any]:
        updates = super().hub_config_updates()
        hub = (getattr(self.config, "hub_layout", None) or {}).get("config") or {}
        norm_head = bool(getattr(self.config, "norm_head", False))
        # the vocabulary says whether the head is normalised unless it was resized or the key is there already
        if NORM_HEAD_KEY in hub or norm_head != (int(self.config.vocab_size) == BAICHUAN2_VOCAB):
            updates[NORM_HEAD_KEY] = norm_head
        return updates


class BaichuanNativeForCausalLM(_BaichuanMixin, LlamaForCausalLM):
    """Baichuan-7B / Baichuan2-7B: Llama with RoPE; Baichuan2's normalised head."""

    config_class = BaichuanNativeConfig

    def __init__(self, config: BaichuanNativeConfig) -> None:
        super().__init__(config)
        self._use_norm_head()


class BaichuanAlibiNativeForCausalLM(_BaichuanMixin, LlamaForCausalLM):
    """Baichuan-13B / Baichuan2-13B: Llama blocks with ALiBi instead of RoPE; Baichuan2's normalised head.

    Attention runs as eager or sdpa (a per-head additive bias), never flash or flex attention, nor
    lmtune's per-sample sdpa for packed rows (the bias keeps packed samples apart instead)."""

    config_class = BaichuanNativeConfig
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    def __init__(self, config: BaichuanNativeConfig) -> None:
        super().__init__(config)
        self._use_norm_head()
        self.model.rotary_emb = _NoRotary()
        memo = _BiasMemo()
        slopes = alibi_slopes(config.num_attention_heads)
        for layer in self.model.layers:
            # the same projections; only the forward differs (no RoPE, the ALiBi bias)
            layer.self_attn.__class__ = BaichuanAlibiAttention
            layer.self_attn.alibi_slopes = slopes
            layer.self_attn.alibi_memo = memo


def _mapping() -> list:
    return [WeightConverter(source_patterns="self_attn.W_pack.weight",
                            target_patterns=["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                             "self_attn.v_proj.weight"],
                            operations=[Chunk(dim=0)])]


# by class name: the mapping must not reach the hub's own Baichuan classes
for _cls in (BaichuanNativeForCausalLM, BaichuanAlibiNativeForCausalLM):
    register_checkpoint_conversion_mapping(_cls.__name__, _mapping(), overwrite=True)

# the hub's names of linear layers -> the port's (LoRA target_modules written for the hub code)
HUB_LINEAR_NAMES = {"baichuan": {"W_pack": ("q_proj", "k_proj", "v_proj")}}


def native_config(hub: dict) -> BaichuanNativeConfig:
    if hub.get("num_key_value_heads") not in (None, hub.get("num_attention_heads")):
        raise ConfigError("Baichuan config.json has num_key_value_heads != num_attention_heads: Baichuan's W_pack "
                          "holds as many key and value heads as query heads")
    alibi = uses_alibi(hub)
    max_positions = hub.get("model_max_length", 4096) if alibi else hub["max_position_embeddings"]
    z_loss = float(hub.get("z_loss_weight") or 0.0)
    if z_loss:
        from lmtune.core.device import warn_once

        warn_once(f"Baichuan config.json has z_loss_weight={z_loss}: lmtune trains with the plain cross-entropy "
                  "(the z-loss term is not applied)")
    kwargs = llama_kwargs({k: v for k, v in hub.items() if k != "rope_scaling"}, "Baichuan",
                          num_key_value_heads=hub["num_attention_heads"], attention_bias=False, mlp_bias=False,
                          max_position_embeddings=int(max_positions),
                          rope_parameters=rope_parameters(ROPE_BASE, None, "Baichuan"))
    return BaichuanNativeConfig(**kwargs, position_embedding="alibi" if alibi else "rope",
                                norm_head=uses_norm_head(hub), z_loss_weight=z_loss)


def model_class(hub: dict) -> type:
    return BaichuanAlibiNativeForCausalLM if uses_alibi(hub) else BaichuanNativeForCausalLM


def load_tokenizer(path: Any, hub: dict, **kwargs: Any) -> Any:
    """Baichuan's SentencePiece tokenizer, built by transformers' backend from ``tokenizer.model``.

    ``BaichuanTokenizer`` adds BOS unless its tokenizer_config.json says ``add_bos_token: false`` (Baichuan-13B's
    has no such key; Baichuan2's set it to false); transformers' backend would add none without the key."""
    from lmtune.model.ports import llama_rule_tokenizer

    return llama_rule_tokenizer(path, **kwargs)
