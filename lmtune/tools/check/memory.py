"""The engine a run would use and the memory it needs per device: the model ``lmtune check`` reports.

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
computes logits where a token is trained. Sequence parallelism (``sequence_parallel_size`` S) splits each row
over S devices: activations and logits are those of ``max_length / S`` tokens (rounded up); the Ulysses
exchange holds a layer's queries, keys and values for the whole row but 1/S of the heads, the same bytes.
Preference training: a pair is two sequences (a batch of pairs is
2 x batch rows of max_length tokens, or packed rows of max_packed_length), and a DPO reference that is a model
of its own (full fine-tuning) adds its frozen weights, in the dtype they are loaded in (sharded like the weights
under ZeRO-3 / FSDP2); with LoRA the reference is the base model with its adapters disabled (nothing more), and
its forward pass keeps no activations. Not counted: the CUDA context and kernels' workspaces
(about 0.5-1 GiB) and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmtune.core.errors import ConfigError
from lmtune.tools.check.model import ModelFacts

GIB = 1024**3


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
    reference: float = 0.0  # a resident reference model of preference training (DPO without LoRA)
    detail: dict = field(default_factory=dict)

    def total(self, checkpointing: bool | None = None) -> float:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        acts = self.activations_checkpointed if ckpt else self.activations
        return self.weights + self.gradients + self.optimizer + acts + self.logits + self.reference


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


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


__all__ = ["GIB", "Engine", "MemoryEstimate", "estimate_memory", "human_bytes", "resolve_engine"]
