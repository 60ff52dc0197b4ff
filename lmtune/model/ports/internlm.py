"""InternLM, InternLM2 / 2.5 and InternLM3 on transformers' Llama implementation.

- InternLM2 is Llama with other names and one fused, head-grouped ``wqkv`` projection
  (``lmtune.model.ports.ops.GroupedQKVSplit``): ``tok_embeddings``, ``attention.wqkv``/``wo``,
  ``feed_forward.w1`` (gate) / ``w3`` (up) / ``w2`` (down), ``attention_norm``, ``ffn_norm``,
  ``output``. Its config's ``bias`` covers ``wqkv`` and ``wo``, which is Llama's ``attention_bias``.
  Its dynamic NTK scaling is transformers' ``dynamic`` RoPE; the hub code keeps a scaled base after
  a long input for later short ones, transformers recomputes it per call (the same for any one input).
- InternLM3 keeps Llama's names; its ``qkv_bias`` (q, k, v) and ``bias`` (o and the MLP) must agree,
  as they do in the released models, because Llama's ``attention_bias`` covers all four projections.
- InternLM (v1) keeps Llama's names with biased q, k, v and o; its RoPE is ``rotary = {"base",
  "type": "origin" | "dynamic", "scaling_factor"}``.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.llama_like import llama_kwargs, rope_parameters
from lmtune.model.ports.ops import GroupedQKVSplit, hub_mapping


class InternLM2NativeConfig(LlamaConfig):
    model_type = "internlm2"


class InternLM3NativeConfig(LlamaConfig):
    model_type = "internlm3"


class InternLMNativeConfig(LlamaConfig):
    model_type = "internlm"


class InternLM2NativeForCausalLM(HubLayoutMixin, LlamaForCausalLM):
    config_class = InternLM2NativeConfig


class InternLM3NativeForCausalLM(HubLayoutMixin, LlamaForCausalLM):
    config_class = InternLM3NativeConfig


class InternLMNativeForCausalLM(HubLayoutMixin, LlamaForCausalLM):
    config_class = InternLMNativeConfig


def _internlm2_mapping() -> list:
    renames = [(r"model\.tok_embeddings\.", "model.embed_tokens."), (r"^output\.", "lm_head."),
               (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
               (r"\.attention\.wo\.", ".self_attn.o_proj."), (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
               (r"\.feed_forward\.w3\.", ".mlp.up_proj."), (r"\.feed_forward\.w2\.", ".mlp.down_proj.")]
    return hub_mapping(renames, "attention.wqkv", GroupedQKVSplit)


# by class name: the mapping must not reach the hub's own InternLM2 classes (model_type "internlm2" too)
register_checkpoint_conversion_mapping(InternLM2NativeForCausalLM.__name__, _internlm2_mapping(), overwrite=True)

# the hub's names of linear layers -> the port's (LoRA target_modules written for the hub code)
HUB_LINEAR_NAMES = {"internlm2": {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w1": ("gate_proj",),
                                  "w3": ("up_proj",), "w2": ("down_proj",), "output": ("lm_head",)}}


def native_config(hub: dict) -> LlamaConfig:
    kind = hub.get("model_type")
    if kind == "internlm2":
        bias = bool(hub.get("bias", True))
        return InternLM2NativeConfig(**llama_kwargs(hub, "InternLM2", attention_bias=bias, mlp_bias=False))
    if kind == "internlm3":
        qkv_bias, bias = bool(hub.get("qkv_bias", False)), bool(hub.get("bias", False))
        if qkv_bias != bias:
            raise ConfigError(f"InternLM3 config.json has qkv_bias={qkv_bias} and bias={bias}: lmtune's InternLM3 "
                              "(transformers' Llama implementation) needs them equal, as in the released models")
        return InternLM3NativeConfig(**llama_kwargs(hub, "InternLM3", attention_bias=bias, mlp_bias=bias))
    rotary = dict(hub.get("rotary") or {})
    scaling = None
    if rotary.get("type") == "dynamic" and float(rotary.get("scaling_factor", 1.0)) != 1.0:
        scaling = {"rope_type": "dynamic", "factor": float(rotary["scaling_factor"])}
    rope = rope_parameters(rotary.get("base", hub.get("rope_theta", 10000.0)), scaling, "InternLM")
    return InternLMNativeConfig(**llama_kwargs(hub, "InternLM", attention_bias=bool(hub.get("bias", True)),
                                               mlp_bias=False, rope_parameters=rope))


def model_class(hub: dict) -> type:
    return {"internlm2": InternLM2NativeForCausalLM, "internlm3": InternLM3NativeForCausalLM}.get(
        hub.get("model_type"), InternLMNativeForCausalLM)
