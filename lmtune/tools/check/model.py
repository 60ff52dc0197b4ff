"""The model of a config built on the meta device: parameter counts and shapes, no weight read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmtune.config.build import build, is_type_dict, resolve_callable
from lmtune.core.errors import ConfigError

# from_pretrained arguments that are not model-config attributes
_LOADER_ONLY = ("dtype", "torch_dtype", "device_map", "quantization_config", "low_cpu_mem_usage",
                "attn_implementation", "use_safetensors", "weights_only", "offload_folder", "offload_state_dict",
                "max_memory", "variant", "load_in_4bit", "load_in_8bit", "tp_plan", "key_mapping")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


@dataclass
class ModelFacts:
    """What the check learned from the model built on the meta device."""

    name: str
    total_params: int
    trainable_params: int
    quantized_params: int  # weights of the quantized linear layers (frozen)
    quant_bits: int | None  # 4, 8 or None
    double_quant: bool
    layers: int
    hidden: int
    heads: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None
    attn_implementation: str
    lora_dropout_features: int  # sum of in_features of the LoRA-adapted linears with dropout > 0
    attention_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    implementation: str = ""  # which code runs the model (lmtune.model.ports.implementation)
    config_dtype: Any = None

    @property
    def frozen_other_params(self) -> int:
        return self.total_params - self.trainable_params - self.quantized_params


def _dtype_bytes(value: Any) -> int | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return _DTYPE_BYTES.get(name)


def _model_cfg(cfg: Any) -> dict:
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise ConfigError("the config has no model=dict(...)")
    return dict(model)


def _quant_config(llm: dict) -> Any:
    quant = llm.get("quantization_config")
    if quant is None:
        return None
    return build(quant, key="model.llm.quantization_config")


def _linear_names(model: Any) -> list[str]:
    """What ``SupervisedFinetune`` targets when ``target_modules`` is unset: every linear layer but the output
    head (on the meta device no layer is quantized yet, so plain ``nn.Linear`` are all there is)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def build_meta_model(cfg: Any, tokenizer: Any = None) -> ModelFacts:
    """Count the parameters of the config's model without loading weights (see the module doc)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtune.config.model_resource import PATH_KEY
    from lmtune.model import ports

    model_cfg = _model_cfg(cfg)
    llm = model_cfg.get("llm")
    if not is_type_dict(llm) or getattr(resolve_callable(llm["type"], "model.llm"), "__name__", "") \
            != "from_pretrained":
        raise ConfigError("model.llm is not a dict(type=AutoModelForCausalLM.from_pretrained, ...): the check "
                          "cannot count its parameters without building it")
    kwargs = {k: v for k, v in llm.items() if k != "type"}
    path = kwargs.pop(PATH_KEY, None)
    if path is None:
        raise ConfigError(f"model.llm has no {PATH_KEY}")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    attn = kwargs.get("attn_implementation")
    trust = bool(kwargs.pop("trust_remote_code", False))
    for key in _LOADER_ONLY:
        kwargs.pop(key, None)
    if model_cfg.get("max_position_embeddings") is not None:
        kwargs["max_position_embeddings"] = model_cfg["max_position_embeddings"]
    extra = {"attn_implementation": attn} if attn else {}
    ports.check_model_config(model_cfg)
    hub = ports.hub_config(path)
    family = ports.family_of(hub)
    try:
        if family is not None:  # a hub-code family: the port lmtune trains it with
            model = ports.empty_model(family, hub, path, **kwargs, **extra)
        else:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust, **kwargs)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, **extra)
    except (OSError, KeyError) as exc:
        raise ConfigError(f"model.llm: cannot read the model config of {path!r}: {exc}") from None
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"model.llm: cannot build the model of {path!r} on the meta device: {exc}") from None
    config = model.config
    implementation = ports.implementation(path, trust_remote_code=trust)
    if model_cfg.get("tokenizer") is not None and tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # as SupervisedFinetune does
            with init_empty_weights(include_buffers=False):
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    quant = _quant_config(llm)
    bits = 4 if getattr(quant, "load_in_4bit", False) else 8 if getattr(quant, "load_in_8bit", False) else None
    quantized = 0
    if bits:
        skip = set(getattr(quant, "llm_int8_skip_modules", None) or [])
        try:
            from transformers.quantizers.base import get_keys_to_not_convert

            skip |= set(get_keys_to_not_convert(model))
        except Exception:  # noqa: BLE001 - an older/newer transformers: keep the output head in full precision
            head = model.get_output_embeddings()
            skip |= {n for n, m in model.named_modules() if m is head}
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and not any(name == k or name.endswith("." + k) or
                                                             name.startswith(k + ".") for k in skip):
                quantized += module.weight.numel()

    lora_targets: list[str] = []
    dropout_features = 0
    lora, peft_model = model_cfg.get("lora"), model_cfg.get("peft_model")
    if lora is not None or peft_model is not None:
        from peft import PeftConfig, get_peft_model

        if peft_model is not None:
            try:
                lora_obj = PeftConfig.from_pretrained(str(peft_model))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"model.peft_model: cannot read the adapter config in {peft_model!r}: {exc}") \
                    from None
            lora_obj.inference_mode = False
        else:
            lora_cfg = dict(lora) if is_type_dict(lora) else lora
            if isinstance(lora_cfg, dict):
                if lora_cfg.get("target_modules") is None:
                    lora_cfg["target_modules"] = _linear_names(model)
                lora_cfg["target_modules"] = ports.native_target_modules(model, lora_cfg["target_modules"])
                lora_obj = build(lora_cfg, key="model.lora")
            else:
                lora_obj = lora_cfg
                if getattr(lora_obj, "target_modules", None) is None:
                    lora_obj.target_modules = _linear_names(model)
        for param in model.parameters():
            param.requires_grad_(False)
        model = get_peft_model(model, lora_obj)
        targets = getattr(lora_obj, "target_modules", None) or []
        lora_targets = sorted(targets) if not isinstance(targets, str) else [targets]
        for module in model.modules():
            drop = getattr(module, "lora_dropout", None)
            base = getattr(module, "base_layer", None)
            if isinstance(drop, torch.nn.ModuleDict) and base is not None:
                if any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in drop.values()):
                    dropout_features += int(getattr(base, "in_features", 0) or 0)

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ModelFacts(
        name=type(base).__name__, total_params=total, trainable_params=trainable, quantized_params=quantized,
        quant_bits=bits, double_quant=bool(getattr(quant, "bnb_4bit_use_double_quant", False)),
        layers=int(text.num_hidden_layers), hidden=hidden, heads=heads, q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim, intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        vocab=int(base.get_input_embeddings().num_embeddings),
        max_positions=getattr(text, "max_position_embeddings", None),
        attn_implementation=str(getattr(base.config, "_attn_implementation", None) or attn or "sdpa"),
        lora_dropout_features=dropout_features, lora_targets=lora_targets, implementation=implementation,
        attention_dropout=float(getattr(text, "attention_dropout", 0.0) or 0.0),
        config_dtype=dtype if dtype not in (None, "auto") else getattr(text, "dtype", None)
        or getattr(text, "torch_dtype", None))


def _weight_bytes(cfg: Any, facts: ModelFacts) -> float:
    llm = dict(_model_cfg(cfg).get("llm") or {})
    requested = llm.get("dtype", llm.get("torch_dtype", "auto"))
    size = _dtype_bytes(requested) if requested != "auto" else None
    if size is None:
        size = _dtype_bytes(facts.config_dtype) or 4
    return float(size)


__all__ = ["ModelFacts", "build_meta_model"]
