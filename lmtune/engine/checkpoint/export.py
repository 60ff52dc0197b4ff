"""Export a training checkpoint to Hugging Face format, and merge a LoRA adapter into its base.

``pth_to_hf`` turns ``work_dirs/<cfg>/iter_N`` into a PEFT adapter directory (LoRA/QLoRA)
or a full ``save_pretrained`` model plus tokenizer (full fine-tuning). ``merge`` folds an
adapter into its (unquantized) base model and saves the result.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

from lmtune.core.errors import ConfigError

CONFIG_COPY = "lmtune_config.py"
EXPORT_INFO = "lmtune_export.json"


# ------------------------------------------------------------------ helpers

def _check_checkpoint(checkpoint: str | os.PathLike) -> Path:
    from lmtune.engine.checkpoint import format as ckpt

    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint not found: {path} (expected a directory such as work_dirs/cfg/iter_500)")
    if not (path / ckpt.WEIGHTS).is_file():
        raise ConfigError(f"checkpoint {path} has no {ckpt.WEIGHTS}; it is incomplete or not an lmtune checkpoint")
    if not (path / ckpt.META).is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {ckpt.META}); pick another one")
    return path


def _template_name(template: Any) -> Any:
    """The name of a built-in prompt template equal to ``template``, else the template as a plain dict."""
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    if template is None:
        return None
    if isinstance(template, str):
        return template
    plain = dict(template)
    for name, known in PROMPT_TEMPLATE.items():
        if dict(known) == plain:
            return name
    return {k: v for k, v in plain.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _base_model_path(cfg: Any) -> str | None:
    llm = cfg.get("model", {}).get("llm")
    if isinstance(llm, dict) and llm.get("pretrained_model_name_or_path") is not None:
        return str(llm["pretrained_model_name_or_path"])
    value = cfg.get("pretrained_model_name_or_path")
    return None if value is None else str(value)


def _save_tokenizer(source: str | os.PathLike, save_dir: Path, tokenizer_cfg: Any = None,
                    trust_remote_code: bool = False) -> bool:
    from transformers import AutoTokenizer

    from lmtune.config import build
    from lmtune.model import ports

    try:
        if tokenizer_cfg is not None:
            tokenizer = build(tokenizer_cfg, key="tokenizer")
        else:
            tokenizer = ports.from_pretrained(AutoTokenizer, str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    ports.save_tokenizer(tokenizer, save_dir)  # a ported family's own tokenizer files, as the hub has them
    return True


def _is_4bit(model_dir: str | os.PathLike) -> bool:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    method = str(quant.get("quant_method", "bitsandbytes")).lower()
    return "bitsandbytes" in method and bool(quant.get("load_in_4bit") or quant.get("_load_in_4bit"))


def _save_model(model: Any, save_dir: Path, safe_serialization: bool, **kwargs: Any) -> None:
    """``save_pretrained``; transformers 5 writes only safetensors and dropped ``safe_serialization``."""
    import inspect
    import warnings

    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        warnings.warn("this transformers version saves only .safetensors; --no-safe-serialization is ignored",
                      stacklevel=2)
    model.save_pretrained(str(save_dir), **kwargs)


# ------------------------------------------------------------------ pth_to_hf

def pth_to_hf(config: str | os.PathLike | None, checkpoint: str | os.PathLike, save_dir: str | os.PathLike,
              fp32: bool = False, max_shard_size: str = "2GB", safe_serialization: bool = True,
              cfg_options: dict[str, Any] | None = None) -> Path:
    """Export checkpoint ``checkpoint`` (an ``iter_N`` dir) of the run configured by ``config`` to ``save_dir``."""
    from safetensors.torch import load_file

    from lmtune.configs import load_config
    from lmtune.model.preference import PreferenceModel
    from lmtune.model.reward import RewardModel
    from lmtune.model.sft import SupervisedFinetune

    ckpt_dir = _check_checkpoint(checkpoint)
    if config is None:
        config = ckpt_dir / "config.py"
        if not config.is_file():
            raise ConfigError(f"checkpoint {ckpt_dir} holds no config.py; pass the training config explicitly")
    cfg = load_config(config, cfg_options)  # a file, or the name of a built-in config
    if "model" not in cfg or not isinstance(cfg.model, dict):
        raise ConfigError(f"config {config} has no model=dict(...) to rebuild the trained model from")
    model_cfg = dict(cfg.model)
    model_type = _model_class(model_cfg.pop("type", None))
    model_cfg["use_activation_checkpointing"] = False
    model_cfg["llm"] = _loadable_on_this_device(model_cfg.get("llm"))
    # full fine-tuning: the checkpoint holds every weight, so the base weights are never read
    reward = model_type is not None and issubclass(model_type, RewardModel)
    # (a reward model's checkpoint lacks its frozen LM head: its base weights are read)
    skeleton = _empty_llm(model_cfg.get("llm")) if model_cfg.get("lora") is None and not model_cfg.get(
        "peft_model") and not reward else None
    if skeleton is not None:
        model_cfg["llm"] = skeleton
        model_cfg.pop("max_position_embeddings", None)
    if model_type is not None and issubclass(model_type, PreferenceModel):
        # a preference-trained policy is exported as the LM it is: its objective's settings (beta, loss type,
        # reference model) do not enter the export
        kept = set(inspect.signature(SupervisedFinetune.__init__).parameters)
        model_cfg = {k: v for k, v in model_cfg.items() if k in kept}
    cls = RewardModel if reward else SupervisedFinetune
    try:
        model = cls(**model_cfg)
    except TypeError as exc:
        raise ConfigError(f"model settings of {config} do not fit {cls.__name__}: {exc}") from exc
    model.load_trainable_state_dict(load_file(str(ckpt_dir / "model.safetensors")), assign=skeleton is not None)
    if cls is RewardModel and model.reward_token_id is None:  # XTuner's configs give it to the dataset only
        dataset = dict(dict(cfg.get("train_dataloader") or {}).get("dataset") or {})
        model.reward_token_id = dataset.get("reward_token_id", cfg.get("reward_token_id"))
    return export_model(model, cfg, Path(config).read_text(encoding="utf-8"), save_dir, fp32=fp32,
                        max_shard_size=max_shard_size, safe_serialization=safe_serialization,
                        checkpoint=ckpt_dir)


def _model_class(kind: Any) -> type | None:
    """The model class a config's ``model.type`` names (a class or its dotted path), or None."""
    from lmtune.config.build import resolve_callable

    if kind is None:
        return None
    found = resolve_callable(kind, "model.type") if isinstance(kind, str) else kind
    return found if isinstance(found, type) else None


def _loadable_on_this_device(llm_cfg: Any) -> Any:
    """``llm_cfg`` with float16 weights loaded as bfloat16 on a CPU, as training does there, but without its
    warning: nothing is trained here, and the export is saved in the config's dtype all the same."""
    import torch

    from lmtune.config import is_type_dict
    from lmtune.core.device import as_dtype, default_device

    if not is_type_dict(llm_cfg) or default_device().type != "cpu":
        return llm_cfg
    key = "dtype" if "dtype" in llm_cfg else "torch_dtype"
    value = llm_cfg.get(key)
    if value is None or value == "auto" or as_dtype(value) != torch.float16:
        return llm_cfg
    return {**llm_cfg, key: torch.bfloat16}


def _empty_llm(llm_cfg: Any) -> Any:
    """The model of ``llm_cfg`` (a ``from_pretrained`` dict) with its parameters on the meta device, or None.

    Buffers (rotary frequencies and the like) are real; the parameters cost nothing until a
    full checkpoint is assigned to them. None where the model cannot be built this way
    (quantized, not a ``from_pretrained`` dict, or a config that transformers cannot read).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtune.config import is_type_dict
    from lmtune.model import ports

    if not is_type_dict(llm_cfg) or getattr(llm_cfg["type"], "__name__", "") != "from_pretrained":
        return None
    kwargs = {k: v for k, v in llm_cfg.items() if k != "type"}
    if kwargs.get("quantization_config") is not None:
        return None
    path = kwargs.pop("pretrained_model_name_or_path", None)
    if path is None:
        return None
    for loader_only in ("dtype", "torch_dtype", "device_map", "quantization_config", "low_cpu_mem_usage",
                        "attn_implementation", "use_safetensors", "weights_only", "offload_folder"):
        kwargs.pop(loader_only, None)
    trust = bool(kwargs.get("trust_remote_code", False))
    hub = ports.hub_config(path)
    family = ports.family_of(hub)
    try:
        if family is not None:
            return ports.empty_model(family, hub, path, **kwargs)
        config = AutoConfig.from_pretrained(str(path), **kwargs)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def export_model(model: Any, cfg: Any, config_text: str, save_dir: str | os.PathLike, fp32: bool = False,
                 max_shard_size: str = "2GB", safe_serialization: bool = True,
                 checkpoint: Path | None = None) -> Path:
    """Write a trained ``SupervisedFinetune`` as a PEFT adapter (LoRA/QLoRA) or a Hugging Face model with
    its tokenizer (full), with the training config and ``lmtune_export.json`` (template, system prompt)."""
    import torch

    from lmtune.core.device import as_dtype

    model.eval()
    model_cfg = dict(cfg.model)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "v_head"):  # a reward model: a standard sequence-classification model, adapters merged
        llm_cfg = model_cfg.get("llm")
        dtype = torch.float32 if fp32 else (as_dtype(llm_cfg.get("dtype", llm_cfg.get("torch_dtype")))
                                            if isinstance(llm_cfg, dict) and llm_cfg.get(
                                                "dtype", llm_cfg.get("torch_dtype")) not in (None, "auto") else None)
        _save_model(model.sequence_classifier(dtype), save_dir, safe_serialization, max_shard_size=max_shard_size)
        _save_tokenizer(_base_model_path(cfg) or "", save_dir, cfg.get("tokenizer") or model_cfg.get("tokenizer"),
                        trust_remote_code=isinstance(llm_cfg, dict) and bool(llm_cfg.get("trust_remote_code")))
    elif model.use_lora:
        model.llm.save_pretrained(str(save_dir), safe_serialization=safe_serialization)
    else:
        llm = model.llm
        llm_cfg = model_cfg.get("llm")
        dtype = None
        if fp32:
            dtype = torch.float32
        elif isinstance(llm_cfg, dict):
            dtype = llm_cfg.get("dtype", llm_cfg.get("torch_dtype"))
            dtype = None if dtype == "auto" else as_dtype(dtype)
        if dtype is not None:
            llm = llm.to(dtype)
        llm.config.use_cache = True
        _save_model(llm, save_dir, safe_serialization, max_shard_size=max_shard_size)
        tokenizer_cfg = cfg.get("tokenizer") or model_cfg.get("tokenizer")
        _save_tokenizer(_base_model_path(cfg) or "", save_dir, tokenizer_cfg,
                        trust_remote_code=isinstance(llm_cfg, dict) and bool(llm_cfg.get("trust_remote_code")))

    (save_dir / CONFIG_COPY).write_text(config_text, encoding="utf-8")
    info: dict[str, Any] = {"base_model": _base_model_path(cfg),
                            "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
                            "lora": bool(model.use_lora) and not hasattr(model, "v_head")}
    if hasattr(model, "v_head"):
        info["reward_model"] = True
        info["reward_token_id"] = model.reward_token_id
    llm_cfg = model_cfg.get("llm")
    if isinstance(llm_cfg, dict) and llm_cfg.get("trust_remote_code"):
        info["trust_remote_code"] = True  # the training config asked to run the base model's own code
    template = _template_name(cfg.get("prompt_template"))
    if template is not None:
        info["prompt_template"] = template
    if cfg.get("SYSTEM"):
        info["system"] = cfg.get("SYSTEM")
    (save_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return save_dir


# ------------------------------------------------------------------ merge

def merge(base: str | os.PathLike, adapter: str | os.PathLike, save_dir: str | os.PathLike,
          max_shard_size: str = "2GB", device: str = "cpu", safe_serialization: bool = True,
          trust_remote_code: bool | None = None) -> Path:
    """Merge the LoRA adapter in ``adapter`` into the model in ``base`` and save the result to ``save_dir``.

    The base model's own code (a repository's ``modeling_*.py``) runs only with ``trust_remote_code``: when
    asked, or, left None, when the training config recorded beside the adapter said so. A hub-code family
    lmtune ports needs none."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.model import ports

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json); "
                          "export a LoRA checkpoint with `lmtune convert pth_to_hf` first")
    if _is_4bit(base):
        raise ConfigError(f"{base} is a 4-bit quantized model: a LoRA adapter cannot be merged into 4-bit "
                          "weights; merge into the dequantized base instead (the original fp16/bf16 model the "
                          "QLoRA run was started from)")
    if trust_remote_code is None:
        trust_remote_code = bool(_export_record(adapter).get("trust_remote_code", False))
    device_map = {"": device} if device in ("cpu", "cuda") else device
    try:
        model = ports.from_pretrained(AutoModelForCausalLM, str(base), dtype="auto", device_map=device_map,
                                      trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(f"{base} ships its own model code, which lmtune runs only when asked: add "
                          "--trust-remote-code if you trust the Python files in that repository") from None
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    _save_model(merged, save_dir, safe_serialization, max_shard_size=max_shard_size)
    has_tokenizer = any((adapter / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
    _save_tokenizer(adapter if has_tokenizer else base, save_dir, trust_remote_code=trust_remote_code)
    _carry_export_record(adapter, save_dir, base)
    return save_dir


def read_export_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``lmtune_export.json`` of an export directory (None without one, or when it holds no object);
    an unreadable one is a ConfigError naming it."""
    path = Path(directory) / EXPORT_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    return info if isinstance(info, dict) else None


def _export_record(directory: Path) -> dict[str, Any]:
    return read_export_record(directory) or {}


def _carry_export_record(adapter: Path, save_dir: Path, base: str | os.PathLike) -> None:
    """Give the merged model the adapter's training config and export record (template, system prompt),
    so that ``lmtune chat MERGED`` talks as the adapter was trained to."""
    if (adapter / CONFIG_COPY).is_file():
        (save_dir / CONFIG_COPY).write_text((adapter / CONFIG_COPY).read_text(encoding="utf-8"), encoding="utf-8")
    try:
        info = _export_record(adapter)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the merged model is in {save_dir} without it") from None
    info.update(lora=False, merged_adapter=str(adapter.resolve()), base_model=str(base))
    (save_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
