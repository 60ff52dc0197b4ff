"""Building the causal LM of ``SupervisedFinetune``: loading (dtype, quantization, attention), LoRA, and the
settings training needs (activation checkpointing, trainable 4-bit layouts)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmtune.config.build import build, is_type_dict
from lmtune.core.device import as_dtype, warn_once
from lmtune.core.dist import sequence_parallel_size
from lmtune.core.errors import ConfigError
from lmtune.model.compile import decoder_layers
from lmtune.model.ports import native_target_modules
from lmtune.model.quantization import check_4bit_backend


def _flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Names (last component) of every linear layer, quantized ones included, but the output head."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, linear_types) and module is not head}
    return sorted(names)


def has_fused_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds MoE experts as fused 3-D weights (transformers 5's Mixtral, DeepSeek...)."""
    return any(type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in module.parameters(False))
               for module in model.modules())


def keep_4bit_weights_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without grad (as
    the evaluate-chat hook does) permanently switches its weight to a packed
    inference layout whose kernel has no backward, so later training steps
    silently lose the gradient through every quantized layer. Training needs
    the trainable layout at all times.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def keep_last_layer_activations(causal_lm: nn.Module) -> None:
    """Turn activation checkpointing off in the last checkpointed decoder layer of ``causal_lm``.

    Its backward pass is the first to run, right after the loss: the activations it would
    recompute are then held anyway, so checkpointing it only repeats its forward pass.
    """
    layers = [m for m in decoder_layers(causal_lm) if getattr(m, "gradient_checkpointing", False)]
    if layers:
        layers[-1].gradient_checkpointing = False


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, by transformers 5's name for it where it has one
    (``gradient_checkpointing_enable`` is its deprecated alias there)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# the attention implementations that flash-attn's kernels provide (transformers' names)
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def build_llm(llm: Any, max_position_embeddings: int | None, device: torch.device,
              use_varlen_attn: bool = False) -> tuple[nn.Module, bool]:
    """The causal LM of ``model.llm`` (a model, or a dict that builds one) and whether it is quantized."""
    if not is_type_dict(llm):
        return llm, False
    quantized = False
    cfg = dict(llm)
    for flag in ("load_in_8bit", "load_in_4bit"):  # transformers 4 style; transformers 5 wants a config
        if cfg.pop(flag, False) and cfg.get("quantization_config") is None:
            from transformers import BitsAndBytesConfig

            cfg["quantization_config"] = BitsAndBytesConfig(**{flag: True})
    quant = cfg.get("quantization_config")
    if quant is not None:
        quant_obj = build(quant, key="model.llm.quantization_config")
        if getattr(quant_obj, "load_in_4bit", False) or getattr(quant_obj, "load_in_8bit", False):
            quantized = True
            check_4bit_backend(device.type, getattr(quant_obj, "bnb_4bit_compute_dtype", None))
            if device.type == "cuda":
                cfg.setdefault("device_map", {"": device.index or 0})
        cfg["quantization_config"] = quant_obj
    if "torch_dtype" in cfg and "dtype" not in cfg:  # transformers 5 renamed the argument
        cfg["dtype"] = cfg.pop("torch_dtype")
    dtype = cfg.get("dtype")
    if device.type == "cpu" and dtype is not None and dtype != "auto" and as_dtype(dtype) == torch.float16:
        warn_once("float16 weights are not trainable on the CPU: loading the model in bfloat16.")
        cfg["dtype"] = torch.bfloat16
    if sequence_parallel_size() > 1 and (cfg.get("attn_implementation") in FLASH_ATTENTION
                                         or (use_varlen_attn and "attn_implementation" not in cfg)):
        # lmtune's packed SDPA runs the Ulysses exchange; flash-attn's kernels do not take a slice of the sequence
        warn_once("sequence parallelism: the attention runs on lmtune's packed SDPA (it keeps packed samples apart "
                  "and runs the Ulysses exchange) instead of flash-attn, whose kernels cannot take a slice of the "
                  "sequence; same results.")
        cfg["attn_implementation"] = "sdpa"
    elif use_varlen_attn and "attn_implementation" not in cfg:
        if _flash_attn_available(device):
            cfg["attn_implementation"] = "flash_attention_2"
        else:
            warn_once("use_varlen_attn=True: flash-attn is not available here, so packed samples are kept "
                      "apart by SDPA instead: one call per sample, or a block-diagonal mask for models with "
                      "sliding windows or soft-capping (same results).")
    if max_position_embeddings is not None:
        cfg["max_position_embeddings"] = max_position_embeddings
    model = build(cfg, key="model.llm")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.llm built a {type(model).__name__}, not a model")
    return model, quantized


def add_lora(llm: nn.Module, lora: Any, peft_model: str | None) -> nn.Module:
    """``llm`` with LoRA adapters: from a saved adapter (``peft_model``) or a ``LoraConfig`` (or its dict); an
    unset ``target_modules`` means every linear layer but the output head."""
    from peft import PeftModel, get_peft_model

    from lmtune.model.lora_speed import speed_up_lora_layers  # imports peft: only for LoRA runs

    if peft_model is not None:
        llm = PeftModel.from_pretrained(llm, peft_model, is_trainable=True)
        speed_up_lora_layers(llm)
        return llm
    lora_cfg = dict(lora) if is_type_dict(lora) else lora
    if isinstance(lora_cfg, dict):
        if lora_cfg.get("target_modules") is None:
            lora_cfg["target_modules"] = find_all_linear_names(llm)
        lora_cfg["target_modules"] = native_target_modules(llm, lora_cfg["target_modules"])
        lora_cfg = build(lora_cfg, key="model.lora")
    elif getattr(lora_cfg, "target_modules", None) is None:
        lora_cfg.target_modules = find_all_linear_names(llm)
    else:
        lora_cfg.target_modules = native_target_modules(llm, lora_cfg.target_modules)
    if getattr(lora_cfg, "lora_dropout", 0) and has_fused_experts(llm):
        # transformers 5 fuses MoE experts into 3-D weights; peft adapts them only without dropout
        warn_once(f"{type(llm).__name__} keeps its MoE experts fused: LoRA on them needs lora_dropout=0, "
                  f"so lora_dropout={lora_cfg.lora_dropout} is set to 0")
        lora_cfg.lora_dropout = 0.0
    llm = get_peft_model(llm, lora_cfg)
    speed_up_lora_layers(llm)
    return llm


__all__ = ["add_lora", "build_llm", "enable_activation_checkpointing", "find_all_linear_names", "has_fused_experts",
           "keep_4bit_weights_trainable", "keep_last_layer_activations"]
