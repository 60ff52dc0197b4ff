"""``lmtune check CONFIG``: a dry run of a config before it spends GPU hours.

It builds the tokenizer and the first rows of the dataset (``--rows``, default 200: the raw
dataset is loaded, cut to its first rows, and only those are tokenized and packed), renders one
sample with its trained part marked, counts the model's parameters without loading a weight (the
model is built from its config on the meta device and LoRA is applied there), estimates the memory
each device needs and the number of optimizer steps, and flags settings that cannot work. The
report goes to stdout; the exit status is 1 when there are problems, else 0. A config's
``model_resource`` is fetched first (see :mod:`lmtune.config.model_resource`), as training would.

Memory model (per device, bytes; every figure is an estimate)
--------------------------------------------------------------
Weights, without DeepSpeed: frozen weights in the dtype they are loaded in (``torch_dtype``);
4-bit quantized linear weights at 0.5 byte plus their quantization constants (one fp32 absmax
per 64 weights, or with double quantization one byte per 64 weights plus one fp32 per 256
blocks); with 4-bit or 8-bit quantization the remaining frozen weights (embeddings, norms, output
head) are upcast to fp32 by ``prepare_model_for_kbit_training``. Trainable weights are fp32: lmtune
keeps full fine-tuning weights in fp32 (they are the master weights of mixed precision) and peft
makes LoRA adapters fp32. Gradients: 4 bytes per trainable parameter. Optimizer: AdamW keeps 2
fp32 states per trainable parameter (8-bit optimizers: 1 byte per state).

Under DeepSpeed with mixed precision the model is cast to 16 bits (2 bytes per non-quantized
weight, 16-bit gradients) and the optimizer holds an fp32 master copy besides its states
(4 + 8 bytes per trainable parameter for AdamW). ZeRO-1 shards the optimizer states over the
devices, ZeRO-2 also the gradients, ZeRO-3 also the weights (and gathers one layer at a time for
its forward and backward); CPU offload moves the optimizer states (and with ``offload_param`` the
weights) to the host. FSDP2 shards weights, gradients and optimizer states like ZeRO-3.

Activations for ``batch_size`` rows of ``max_length`` tokens (T tokens), in the compute precision
(a = 2 bytes with mixed precision or 16-bit weights, else 4). Per layer and token a decoder layer
keeps ``a x (4h + 3q + 2kv + 4i)`` bytes (h hidden size, q and kv the query and key/value widths,
i the MLP width: the two norms' inputs and outputs, q, k, v and the attention output as attention
keeps them, the o_proj input, and the MLP's gate, up, activation and product; the Llama-style
counterpart of Korthikanti et al.'s ``34 x h`` for GPT layers). Eager attention adds
``2 x a x heads x s`` for its scores and probabilities (SDPA and flash attention keep none). LoRA
dropout adds ``(a + 1) x in_features`` per adapted linear (the dropped copy and its mask). With
activation checkpointing a layer keeps only its input (``a x h`` per token) and one layer at a
time is recomputed in the backward pass. Logits: ``T x vocab x (a + 8)`` bytes (the 16-bit logits,
their fp32 copy and the fp32 log-probabilities the loss keeps); an upper bound, since lmtune only
computes logits where a token is trained. Not counted: the CUDA context and kernels' workspaces
(about 0.5-1 GiB) and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmtune.config.build import build, is_type_dict, resolve_callable
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.engine.optim.optimizer_wrapper import StepSettings
from lmtune.engine.runner.loops import optimizer_steps, run_length

DEFAULT_ROWS = 200
GIB = 1024**3

# from_pretrained arguments that are not model-config attributes
_LOADER_ONLY = ("dtype", "torch_dtype", "device_map", "quantization_config", "low_cpu_mem_usage",
                "attn_implementation", "use_safetensors", "weights_only", "offload_folder", "offload_state_dict",
                "max_memory", "variant", "load_in_4bit", "load_in_8bit", "tp_plan", "key_mapping")
_MARKER = re.compile(r"<\|[^<>|\s]+\|>|</?[a-z][a-z0-9_]*>")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


# ------------------------------------------------------------------ results

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


@dataclass
class Engine:
    name: str
    nproc: int
    deepspeed: bool = False
    zero_stage: int = 0  # FSDP2 counts as 3: weights, gradients and optimizer states sharded
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class MemoryEstimate:
    """Bytes per device (``cpu``: bytes on the host, per process)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # without activation checkpointing
    activations_checkpointed: float
    logits: float
    checkpointing: bool  # as configured
    cpu: float = 0.0
    detail: dict = field(default_factory=dict)

    def total(self, checkpointing: bool | None = None) -> float:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        acts = self.activations_checkpointed if ckpt else self.activations
        return self.weights + self.gradients + self.optimizer + acts + self.logits


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: ModelFacts | None = None
    memory: MemoryEstimate | None = None
    engine: Engine | None = None
    rows: int | None = None  # training rows (estimated unless rows_exact)
    rows_exact: bool = False
    iters_per_epoch: int | None = None
    optimizer_steps: int | None = None
    sample_text: str | None = None
    sample_trained: str | None = None


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else f"{text[:limit]} ... [{len(text) - limit:,} more characters]"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ------------------------------------------------------------------ engine

def resolve_engine(cfg: Any, nproc: int = 1, deepspeed: str | None = None, strategy: str | None = None) -> Engine:
    """The engine a run would use: ``--deepspeed`` / ``--strategy`` first, then the config's ``strategy``."""
    from lmtune.engine.strategies import choose_strategy
    from lmtune.engine.strategies.deepspeed_config import load_deepspeed_json, zero_stage

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of devices, got {nproc!r}")
    chosen, options = choose_strategy(cfg, strategy, deepspeed)
    if chosen == "deepspeed":
        data, source = load_deepspeed_json(options["config"])
        zero = dict(data.get("zero_optimization") or {})
        stage = zero_stage(data, source)

        def offloaded(key: str) -> bool:
            return dict(zero.get(key) or {}).get("device", "none") not in ("none", None)

        name = options["config"] if isinstance(options["config"], str) else source
        return Engine(f"DeepSpeed ZeRO-{stage} ({name})", nproc, deepspeed=True, zero_stage=stage,
                      offload_optimizer=offloaded("offload_optimizer") and stage >= 1,
                      offload_params=offloaded("offload_param") and stage == 3)
    if chosen == "fsdp2":
        return Engine("FSDP2 (fully sharded)", nproc, zero_stage=3 if nproc > 1 else 0)
    return Engine("DDP" if nproc > 1 else "one device", nproc)


# ------------------------------------------------------------------ model on the meta device

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


# ------------------------------------------------------------------ memory

def _optimizer_states(cfg: Any) -> tuple[int, float, str]:
    """(states per trainable parameter, bytes per state, optimizer name)."""
    optim = dict(dict(cfg.get("optim_wrapper") or {}).get("optimizer") or {})
    kind = optim.get("type")
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", "AdamW")
    name = str(name).rsplit(".", 1)[-1]
    lower = name.lower()
    state_bytes = 1.0 if "8bit" in lower else 4.0
    if "adam" in lower or "lamb" in lower:
        return 2, state_bytes, name
    if "lion" in lower:
        return 1, state_bytes, name
    if lower.startswith("sgd"):
        return (1 if float(optim.get("momentum", 0) or 0) > 0 else 0), state_bytes, name
    if lower in ("adagrad", "rmsprop", "adadelta"):
        return (2 if lower == "adadelta" else 1), state_bytes, name
    if "adafactor" in lower:
        return 1, state_bytes, name  # factored second moments: far less than one state; counted as one
    return 2, state_bytes, name


def estimate_memory(facts: ModelFacts, engine: Engine, batch_size: int, seq_len: int, *, mixed_precision: bool,
                    weight_bytes: float, optimizer_states: int = 2, state_bytes: float = 4.0,
                    checkpointing: bool = True) -> MemoryEstimate:
    """Per-device memory of training ``facts`` under ``engine`` (the formulas are in the module doc).

    ``weight_bytes``: bytes per frozen, non-quantized weight as loaded (2 for fp16/bf16, 4 for fp32).
    """
    n = engine.nproc
    trainable, quantized, other = facts.trainable_params, facts.quantized_params, facts.frozen_other_params
    if facts.quant_bits == 4:
        quant_bytes = 0.5 + ((1 / 64 + 4 / (64 * 256)) if facts.double_quant else 4 / 64)
    elif facts.quant_bits == 8:
        quant_bytes = 1.0 + 4 / max(facts.hidden, 1)  # int8 weights plus one fp32 scale per row
    else:
        quant_bytes = 0.0
    if engine.deepspeed:
        half = 2.0 if mixed_precision else 4.0
        weights = quantized * quant_bytes + (other + trainable) * half
        grads = trainable * half
        optim = trainable * ((4.0 if mixed_precision else 0.0) + optimizer_states * state_bytes)
        layer_weights = weights / max(facts.layers, 1)
    else:
        other_bytes = 4.0 if facts.quant_bits else weight_bytes  # prepare_model_for_kbit_training upcasts
        weights = quantized * quant_bytes + other * other_bytes + trainable * 4.0
        grads = trainable * 4.0
        optim = trainable * optimizer_states * state_bytes
        layer_weights = weights / max(facts.layers, 1)
    cpu = 0.0
    detail = {"quant_bytes_per_param": quant_bytes, "weights_unsharded": weights}
    if engine.zero_stage >= 1 and n > 1:
        optim /= n
    if engine.zero_stage >= 2 and n > 1:
        grads /= n
    if engine.zero_stage >= 3 and n > 1:
        weights /= n
    if engine.offload_optimizer:
        cpu += optim
        optim = 0.0
    if engine.offload_params:
        cpu += weights
        weights = 0.0
    if engine.zero_stage >= 3 and (n > 1 or engine.offload_params):
        weights += layer_weights  # the layer being computed is gathered whole

    a = 2.0 if (mixed_precision or (trainable < facts.total_params and weight_bytes <= 2)) else 4.0
    tokens = batch_size * seq_len
    per_token_layer = a * (4 * facts.hidden + 3 * facts.q_dim + 2 * facts.kv_dim + 4 * facts.intermediate)
    if facts.attn_implementation == "eager":
        per_token_layer += 2 * a * facts.heads * seq_len + (facts.heads * seq_len if facts.attention_dropout > 0 else 0)
    per_token_layer += (a + 1) * facts.lora_dropout_features / max(facts.layers, 1)
    outside = tokens * a * 2 * facts.hidden  # embedding output and final norm
    full = tokens * per_token_layer * facts.layers + outside
    ckpt = tokens * a * facts.hidden * facts.layers + tokens * per_token_layer + outside
    logits = tokens * facts.vocab * ((a + 8.0) if a < 4 else 8.0)
    detail.update(activation_bytes=a, per_token_layer=per_token_layer, tokens=tokens)
    return MemoryEstimate(weights=weights, gradients=grads, optimizer=optim, activations=full,
                          activations_checkpointed=ckpt, logits=logits, checkpointing=checkpointing, cpu=cpu,
                          detail=detail)


def _weight_bytes(cfg: Any, facts: ModelFacts) -> float:
    llm = dict(_model_cfg(cfg).get("llm") or {})
    requested = llm.get("dtype", llm.get("torch_dtype", "auto"))
    size = _dtype_bytes(requested) if requested != "auto" else None
    if size is None:
        size = _dtype_bytes(facts.config_dtype) or 4
    return float(size)


# ------------------------------------------------------------------ the check

class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def section(self, title: str) -> None:
        self.out.write(f"\n== {title}\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")


def _tokenizer_cfg(cfg: Any, ds_cfgs: list[dict]) -> Any:
    if cfg.get("tokenizer") is not None:
        return cfg["tokenizer"]
    for ds in ds_cfgs:
        if ds.get("tokenizer") is not None:
            return ds["tokenizer"]
    return _model_cfg(cfg).get("tokenizer")


def _single_token(tokenizer: Any, text: str) -> tuple[bool, int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    return (len(ids) == 1 and ids[0] != unk), len(ids)


def _template_of(cfg: Any, ds_cfgs: list[dict]) -> tuple[bool, Any]:
    """(whether a template is configured, the template: a name, a dict, or None for the chat template)."""
    for ds in ds_cfgs:
        fn = ds.get("template_map_fn")
        if is_type_dict(fn) and "template" in fn:
            return True, fn["template"]
        if fn is not None:
            return True, cfg.get("prompt_template")
    return False, None


def _check_template(report: CheckReport, w: _Report, cfg: Any, ds_cfgs: list[dict], tokenizer: Any) -> None:
    from lmtune.dataset.chat_template import has_chat_template, uses_chat_template
    from lmtune.dataset.templates import PROMPT_TEMPLATE, get_template

    configured, template = _template_of(cfg, ds_cfgs)
    if not configured:
        w.line("prompt template: none (rows are used as they are)")
        return
    if uses_chat_template(template):
        if has_chat_template(tokenizer):
            w.line("prompt template: the tokenizer's own chat template")
        else:
            report.problems.append("prompt_template is None/'auto' (the tokenizer's chat template), but the "
                                   "tokenizer has no chat_template: set prompt_template to a PROMPT_TEMPLATE entry")
        return
    try:
        tpl = get_template(template)
    except (KeyError, TypeError) as exc:
        report.problems.append(f"prompt template: {exc}")
        return
    name = template if isinstance(template, str) else next(
        (k for k, v in PROMPT_TEMPLATE.items() if dict(v) == dict(tpl)), "a custom template")
    stops = [str(s) for s in tpl.get("STOP_WORDS") or []]
    for hook in cfg.get("custom_hooks") or []:
        if isinstance(hook, dict):
            stops += [str(s) for s in (hook.get("stop_words") or []) if str(s) not in stops]
            if hook.get("stop_word") and str(hook["stop_word"]) not in stops:
                stops.append(str(hook["stop_word"]))
    w.line(f"prompt template: {name}; stop words: {', '.join(repr(s) for s in stops) or 'none'}")
    must = {s: "stop word" for s in stops}
    suffix = tpl.get("SUFFIX") or ""
    if tpl.get("SUFFIX_AS_EOS") and suffix and _MARKER.fullmatch(suffix.strip()):
        must.setdefault(suffix.strip(), "end-of-turn SUFFIX")
    for text, role in must.items():
        single, count = _single_token(tokenizer, text)
        if not single:
            report.problems.append(
                f"the prompt template's {role} {text!r} is not a single token of the tokenizer (it encodes to "
                f"{count} tokens): generation will not stop on it, and the template does not fit this model "
                "(pick the template of this model's family, or prompt_template=None for its chat template)")
    markers = sorted({m for key in ("SYSTEM", "INSTRUCTION", "SUFFIX", "SEP") for m in
                      _MARKER.findall(str(tpl.get(key) or ""))} - set(must))
    unknown = [m for m in markers if not _single_token(tokenizer, m)[0]]
    if unknown:
        report.notes.append(f"the template's markers {', '.join(map(repr, unknown))} are plain text for this "
                            "tokenizer (several tokens each); fine for a generic template, a mismatch if the model "
                            "was trained with them as special tokens")


def _data(report: CheckReport, w: _Report, ds_cfgs: list[dict], tokenizer: Any, rows: int,
          vocab: int | None) -> tuple[float | None, bool]:
    """Process the first ``rows`` rows of each dataset; the estimated number of training rows."""
    from lmtune.dataset.huggingface import process_hf_dataset
    from lmtune.dataset.stages import describe_source, train_split
    from lmtune.engine.hooks.chat import DatasetInfoHook

    total_est: float | None = 0.0
    exact = True
    for n, ds_cfg in enumerate(ds_cfgs):
        ds_cfg = dict(ds_cfg)
        fn = resolve_callable(ds_cfg.pop("type"), "train_dataset")
        if fn is not process_hf_dataset:
            report.notes.append(f"dataset {n} is built by {getattr(fn, '__name__', fn)}, not process_hf_dataset: "
                                "not sampled, so the number of steps is not estimated")
            total_est = None
            continue
        source = describe_source(ds_cfg.get("dataset"))
        try:
            raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
        except ConfigError as exc:
            report.problems.append(f"dataset {source}: {exc}")
            total_est = None
            continue
        except Exception as exc:  # noqa: BLE001 - a missing file or hub dataset: reported as a problem
            report.problems.append(f"dataset {source} cannot be loaded: {type(exc).__name__}: {exc}")
            total_est = None
            continue
        all_rows = len(raw)
        effective = min(all_rows, int(ds_cfg.get("max_dataset_length") or all_rows))
        taken = min(rows, all_rows)
        subset = raw.select(range(taken))
        common = {**ds_cfg, "dataset": subset, "use_cache": False, "max_dataset_length": None, "split": "train"}
        common.pop("dataset_wait_timeout", None)
        try:
            samples = process_hf_dataset(**{**common, "pack_to_max_length": False})
        except ConfigError as exc:
            report.problems.append(f"dataset {source}: {exc}")
            total_est = None
            continue
        where = "the whole dataset" if taken == all_rows else f"the first {taken:,} of {all_rows:,} rows"
        w.line(f"dataset {n}: {source}: {where} processed")
        lengths = [len(ids) for ids in samples["input_ids"]]
        trained = sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for lab in samples["labels"])
        tokens = sum(lengths)
        if lengths:
            w.line(f"  {len(lengths):,} samples kept of {taken:,} rows; mean {tokens / len(lengths):.1f} tokens, "
                   f"longest {max(lengths):,}; {100 * trained / max(tokens, 1):.1f}% of the tokens are trained")
        biggest = max((max(ids, default=-1) for ids in samples["input_ids"]), default=-1)
        if vocab is not None and biggest >= vocab:
            report.problems.append(f"dataset {source}: token id {biggest} is outside the model's embedding table "
                                   f"({vocab} rows): pass tokenizer=... to the model so that it resizes "
                                   "its embeddings, or use the model's own tokenizer")
        if n == 0 and len(samples):
            report.sample_text = tokenizer.decode(samples[0]["input_ids"])
            report.sample_trained = DatasetInfoHook.render_labels(tokenizer, samples[0]["labels"])
        pack = ds_cfg.get("pack_to_max_length", True)
        max_length = ds_cfg.get("max_length")
        if pack and len(samples):
            packed = process_hf_dataset(**common)
            if taken == all_rows and effective == all_rows:
                est = float(len(packed))
                w.line(f"  packed into {len(packed):,} row(s) of up to {max_length} tokens")
            else:
                est = math.ceil(tokens / taken * effective / max_length)
                exact = False
                w.line(f"  packed into {len(packed):,} row(s) of up to {max_length} tokens; the whole dataset "
                       f"(~{effective:,} rows) makes ~{est:,} (estimate: its tokens / max_length)")
        else:
            est = len(samples) / max(taken, 1) * effective
            if taken < effective:
                exact = False
                w.line(f"  the whole dataset (~{effective:,} rows) makes ~{est:,.0f} training rows (estimate)")
        if total_est is not None:
            total_est += est
    return total_est, exact


@contextlib.contextmanager
def _quiet():
    """No progress bars from datasets and no deprecation chatter from the libraries in the report."""
    import warnings

    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def check_config(cfg: Any, out: TextIO, nproc: int = 1, deepspeed: str | None = None, strategy: str | None = None,
                 rows: int = DEFAULT_ROWS, gpu_memory_gib: float | None = None) -> CheckReport:
    """Run every check on ``cfg`` (a loaded Config), writing the report to ``out``."""
    with _quiet():
        return _check_config(cfg, out, nproc, deepspeed, strategy, rows, gpu_memory_gib)


def _check_config(cfg: Any, out: TextIO, nproc: int, deepspeed: str | None, strategy: str | None, rows: int,
                  gpu_memory_gib: float | None) -> CheckReport:
    from lmtune.config.model_resource import apply_model_resource
    from lmtune.tools.dataset_tools import dataset_configs

    cfg = apply_model_resource(cfg)
    report = CheckReport()
    w = _Report(out)
    engine = report.engine = resolve_engine(cfg, nproc, deepspeed, strategy)
    w.line(f"lmtune check: {getattr(cfg, 'filename', 'config')}")
    w.line(f"engine: {engine.name}" + (f" over {engine.nproc} devices" if engine.nproc > 1 else ""))

    model_cfg = _model_cfg(cfg)
    ds_cfgs = dataset_configs(cfg)
    loader = dict(cfg.get("train_dataloader") or {})
    batch = int(loader.get("batch_size", 1) or 1)
    step = StepSettings.from_config(cfg.get("optim_wrapper"))
    accum = step.accumulative_counts
    max_length = next((int(d["max_length"]) for d in ds_cfgs if d.get("max_length")), None)

    # -- tokenizer
    w.section("tokenizer")
    tok_cfg = _tokenizer_cfg(cfg, ds_cfgs)
    if tok_cfg is None:
        raise ConfigError("the config names no tokenizer (tokenizer=dict(...) or train_dataset.tokenizer)")
    tokenizer = build(tok_cfg, key="tokenizer")
    specials = ", ".join(f"{k} {getattr(tokenizer, k)!r}" for k in ("bos_token", "eos_token", "pad_token")
                         if getattr(tokenizer, k, None) is not None)
    w.line(f"{type(tokenizer).__name__} from {getattr(tokenizer, 'name_or_path', '?')}: {len(tokenizer):,} tokens"
           + (f"; {specials}" if specials else ""))
    if getattr(tokenizer, "eos_token", None) is None:
        report.notes.append("the tokenizer has no EOS token: unless the template ends each answer with its own "
                            "end marker, the model does not learn where to stop")
    _check_template(report, w, cfg, ds_cfgs, tokenizer)

    # -- model (before the data: the data check compares token ids with the embedding table)
    facts: ModelFacts | None = None
    try:
        facts = report.model = build_meta_model(cfg, tokenizer)
    except ConfigError as exc:
        report.problems.append(str(exc))

    # -- data
    w.section(f"data (first {rows:,} rows of each dataset)")
    est_rows, exact = _data(report, w, ds_cfgs, tokenizer, rows, facts.vocab if facts else None)
    if report.sample_text is not None:
        w.line("[sample 0, input]")
        w.line(_clip(report.sample_text))
        w.line("[sample 0, trained part; [masked: N tokens] = not trained]")
        w.line(_clip(report.sample_trained or ""))

    # -- model report
    w.section("model")
    use_varlen = bool(model_cfg.get("use_varlen_attn", False))
    if facts is not None:
        w.line(f"{facts.name}: {facts.layers} layers, hidden {facts.hidden}, {facts.heads} heads "
               f"(key/value width {facts.kv_dim}), MLP {facts.intermediate}, vocab {facts.vocab:,}, max positions "
               f"{facts.max_positions}, attention {facts.attn_implementation}")
        if facts.implementation:
            w.line(f"runs on: {facts.implementation}")
        share = 100 * facts.trainable_params / max(facts.total_params, 1)
        w.line(f"parameters: {facts.total_params:,} total, {facts.trainable_params:,} trainable ({share:.2f}%)")
        if facts.lora_targets:
            w.line(f"LoRA on: {', '.join(facts.lora_targets)}")
        if facts.quant_bits:
            w.line(f"quantized: {facts.quantized_params:,} linear weights in {facts.quant_bits} bits"
                   + (" (double quantization)" if facts.double_quant else ""))
            if model_cfg.get("lora") is None and model_cfg.get("peft_model") is None:
                report.problems.append("the model is quantized but has no lora=dict(...): quantized weights cannot "
                                       "be trained; add LoRA (QLoRA) or set model.llm.quantization_config=None")
        if max_length and facts.max_positions and max_length > int(facts.max_positions):
            report.problems.append(f"max_length={max_length} is above the model's max_position_embeddings="
                                   f"{facts.max_positions}: positions past it were never trained (or do not exist); "
                                   "lower max_length")
        if len(tokenizer) > facts.vocab:
            report.problems.append(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding table only "
                                   f"{facts.vocab:,}: ids past it crash the training; pass tokenizer=... to the "
                                   "model so that it resizes its embeddings")
    if use_varlen and batch > 1:
        report.problems.append(f"use_varlen_attn=True needs train_dataloader.batch_size=1 (it is {batch}): the "
                               "variable-length attention arguments describe one packed row")
    collate = loader.get("collate_fn")
    if isinstance(collate, dict) and "use_varlen_attn" in collate and bool(collate["use_varlen_attn"]) != use_varlen:
        report.problems.append(f"model.use_varlen_attn={use_varlen} but train_dataloader.collate_fn.use_varlen_attn="
                               f"{collate['use_varlen_attn']}: set both from one use_varlen_attn setting")

    # -- memory
    checkpointing = bool(model_cfg.get("use_activation_checkpointing", True))
    if facts is not None and max_length:
        states, state_bytes, opt_name = _optimizer_states(cfg)
        mixed = step.mixed_precision
        mem = report.memory = estimate_memory(
            facts, engine, batch, max_length, mixed_precision=mixed, weight_bytes=_weight_bytes(cfg, facts),
            optimizer_states=states, state_bytes=state_bytes, checkpointing=checkpointing)
        w.section(f"memory per device (estimate; batch {batch} x {max_length} tokens, {engine.name}"
                  + (f", {engine.nproc} devices)" if engine.nproc > 1 else ")"))
        sharded = {1: "optimizer states sharded", 2: "gradients and optimizer states sharded",
                   3: "weights, gradients and optimizer states sharded"}.get(engine.zero_stage if engine.nproc > 1
                                                                           else 0)
        w.line(f"weights       {human_bytes(mem.weights):>12}"
               + (f"  ({facts.quant_bits}-bit: {mem.detail['quant_bytes_per_param']:.3f} B per quantized weight)"
                  if facts.quant_bits else ""))
        w.line(f"gradients     {human_bytes(mem.gradients):>12}")
        w.line(f"optimizer     {human_bytes(mem.optimizer):>12}  ({opt_name}: {states} state(s) per trainable "
               f"parameter" + (", fp32 master copy" if engine.deepspeed and mixed else "") + ")"
               + (" - offloaded to the CPU" if engine.offload_optimizer else ""))
        w.line(f"activations   {human_bytes(mem.activations_checkpointed):>12}  with activation checkpointing; "
               f"{human_bytes(mem.activations)} without")
        w.line(f"logits        {human_bytes(mem.logits):>12}  (upper bound)")
        w.line(f"total         {human_bytes(mem.total()):>12}  (activation checkpointing "
               f"{'on' if checkpointing else 'off'}, as configured); {human_bytes(mem.total(not checkpointing))} "
               f"with it {'off' if checkpointing else 'on'}")
        if sharded:
            w.line(f"({sharded} over {engine.nproc} devices)")
        if mem.cpu:
            w.line(f"host memory for offloaded state: {human_bytes(mem.cpu)} per process")
        w.line("plus the CUDA context and workspaces (about 0.5-1 GiB); formulas: lmtune/tools/check.py")
        if gpu_memory_gib is not None and mem.total() > gpu_memory_gib * GIB:
            report.problems.append(f"the estimated {human_bytes(mem.total())} per device is more than the "
                                   f"{gpu_memory_gib:g} GiB given with --gpu-memory: lower batch_size or max_length, "
                                   "turn activation checkpointing on, use QLoRA or shard with --deepspeed")

    # -- schedule
    w.section("schedule")
    world = engine.nproc
    w.line(f"{batch} row(s) per device x {accum} accumulation step(s) x {world} device(s) = {batch * accum * world} "
           "rows per optimizer step")
    train_cfg = dict(cfg.get("train_cfg") or {})
    if est_rows is not None:
        rows_total = max(int(round(est_rows)), 0)
        report.rows, report.rows_exact = rows_total, exact
        iters = math.ceil(math.ceil(rows_total / world) / batch) if rows_total else 0
        report.iters_per_epoch = iters
        if iters == 0:
            report.problems.append("the dataset gives no training rows")
        else:
            steps_per_epoch = optimizer_steps(iters, iters, accum)
            max_iters = train_cfg.get("max_iters")
            max_epochs = None if max_iters is not None else train_cfg.get("max_epochs", 1)
            epochs, total_iters = run_length(iters, max_epochs, max_iters)
            epochs_text = f"max_iters={total_iters}" if max_iters is not None else f"{epochs} epoch(s)"
            steps = optimizer_steps(total_iters, iters, accum)
            report.optimizer_steps = steps
            approx = "" if exact else "~"
            w.line(f"training rows: {approx}{rows_total:,}" + ("" if exact else " (estimated from the sampled rows)"))
            w.line(f"iterations per epoch: {approx}{iters:,}; optimizer steps per epoch: {approx}{steps_per_epoch:,}")
            w.line(f"{epochs_text}: {approx}{total_iters:,} iterations, {approx}{steps:,} optimizer steps")
            for key in ("save_steps", "evaluation_freq"):
                value = cfg.get(key)
                if isinstance(value, int) and value > total_iters:
                    report.notes.append(f"{key}={value} is more than the {approx}{total_iters:,} iterations of the "
                                        "run: it never fires before the end")
    else:
        w.line("training rows: unknown (see the notes)")

    # -- verdict
    if report.notes:
        w.section("notes")
        for note in report.notes:
            w.line(f"- {note}")
    w.section("problems" if report.problems else "result")
    for problem in report.problems:
        w.line(f"- {problem}")
    w.line(f"{len(report.problems)} problem(s)" if report.problems else "OK: no problems found")
    return report


def run_check(cfg: Any, out: TextIO, nproc: int = 1, deepspeed: str | None = None, **kwargs: Any) -> list[str]:
    """Check ``cfg`` and write the report to ``out``; the problems found (empty when it looks fine)."""
    return check_config(cfg, out, nproc=nproc, deepspeed=deepspeed, **kwargs).problems


# ------------------------------------------------------------------ command line

def _check_cmd(args: argparse.Namespace) -> int:
    from lmtune.config import parse_overrides
    from lmtune.configs import load_config

    cfg = load_config(args.config, parse_overrides(args.cfg_options))
    problems = run_check(cfg, sys.stdout, nproc=args.nproc, deepspeed=args.deepspeed, strategy=args.strategy,
                         rows=args.rows, gpu_memory_gib=args.gpu_memory)
    return 1 if problems else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``check`` on ``subparsers``."""
    check = subparsers.add_parser(
        "check", help="dry run: tokenizer, a sample, parameter counts, memory and step estimates, problems")
    check.add_argument("config", help="path to a config .py, or a built-in config name")
    check.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override settings")
    check.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="number of devices the run will use (default 1)")
    check.add_argument("--deepspeed", metavar="NAME|JSON",
                       help="estimate for DeepSpeed: a built-in config (deepspeed_zero1 ... deepspeed_zero3_offload) "
                            "or a JSON path")
    check.add_argument("--strategy", choices=["ddp", "fsdp2"], help="estimate for ddp (default) or fsdp2")
    check.add_argument("--rows", type=_positive_int, default=DEFAULT_ROWS,
                       help=f"rows of each dataset to tokenize and pack (default {DEFAULT_ROWS})")
    check.add_argument("--gpu-memory", type=float, metavar="GiB",
                       help="memory of one device: a problem is reported when the estimate is above it")
    check.add_argument("--debug", action="store_true", help="show full tracebacks")
    check.set_defaults(func=_check_cmd)
    return check
