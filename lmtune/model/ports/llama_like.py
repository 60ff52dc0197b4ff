"""What the Llama-shaped ports share: hub config keys -> ``LlamaConfig`` arguments, RoPE settings."""

from __future__ import annotations

from typing import Any

from lmtune.core.errors import ConfigError

# keys of a hub config.json that say how it was made, not what the model is
BOOKKEEPING_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
                    "_name_or_path", "attn_implementation", "pretraining_tp", "hub_layout")


def rope_parameters(theta: Any, scaling: dict | None, family: str) -> dict:
    """transformers 5's ``rope_parameters`` from a hub config's ``rope_theta`` and ``rope_scaling``
    (``{"type" | "rope_type": "linear" | "dynamic" | ..., "factor": f, ...}``)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(theta)}
    if scaling:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{family} config.json: rope_scaling must be a dict, got {scaling!r}")
        kind = scaling.get("rope_type") or scaling.get("type")
        if not kind:
            raise ConfigError(f"{family} config.json: rope_scaling {scaling!r} names no type")
        params.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
        params["rope_type"] = kind
        if "factor" in params:
            params["factor"] = float(params["factor"])
    return params


def llama_kwargs(hub: dict, family: str, **overrides: Any) -> dict:
    """``LlamaConfig`` arguments for a hub config that uses Llama's own key names."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hub]
    if missing:
        raise ConfigError(f"{family} config.json lacks {', '.join(missing)}: is it a {family} checkpoint?")
    kwargs = dict(
        vocab_size=hub["vocab_size"], hidden_size=hub["hidden_size"], intermediate_size=hub["intermediate_size"],
        num_hidden_layers=hub["num_hidden_layers"], num_attention_heads=hub["num_attention_heads"],
        num_key_value_heads=hub.get("num_key_value_heads") or hub["num_attention_heads"],
        hidden_act=hub.get("hidden_act", "silu"), max_position_embeddings=hub.get("max_position_embeddings", 2048),
        initializer_range=hub.get("initializer_range", 0.02), rms_norm_eps=hub.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hub.get("tie_word_embeddings", False)),
        bos_token_id=hub.get("bos_token_id"), eos_token_id=hub.get("eos_token_id"),
        pad_token_id=hub.get("pad_token_id"),
        rope_parameters=rope_parameters(hub.get("rope_theta", 10000.0), hub.get("rope_scaling"), family))
    if hub.get("head_dim"):
        kwargs["head_dim"] = hub["head_dim"]
    kwargs.update(overrides)
    return kwargs
