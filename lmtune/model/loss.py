"""Token-level cross-entropy for causal language modelling.

Two ways to the same number:

- ``causal_lm_loss_sum``: cross-entropy of logits the model has already computed;
- ``linear_cross_entropy_sum``: cross-entropy of ``head(hidden)`` computed a chunk of
  tokens at a time, so that neither the forward nor the backward pass ever holds the
  logits of every token at once (with a 128k vocabulary, the fp32 logits of 16k tokens
  alone take 8 GiB, and their gradient as much again).

In all of the chunked implementations but ``"checkpoint"``, the forward pass computes each
chunk's logits, its loss and right away its gradients (of the hidden states and of the
head's trainable weights, accumulated in fp32), then drops the logits before the next
chunk; the backward pass only scales the stored gradients by the incoming one, in place.
The head's matmuls run in the autocast dtype when autocast is on, as they would in the
model. ``choose_impl`` picks, in this order:

``"liger"``
    Liger Kernel's fused linear cross-entropy (Triton, CUDA only), when ``liger_kernel``
    is importable, the head is a plain ``nn.Linear`` and the logits are at most softcapped.
``"linear"``
    A plain ``nn.Linear`` head: the gradient of the cross-entropy is written out
    (``softmax - one_hot``, through the scale and softcap), computed in place in one fp32
    buffer of the chunk's logits, and accumulated into the fp32 weight gradient by one
    matmul per chunk (on CUDA straight into fp32, ``addmm(out_dtype=float32)``).
``"module"``
    Any other head (PEFT's LoRA on the head or ``modules_to_save`` wrapper, a quantized
    head): the head module is called on each chunk and autograd differentiates the chunk.
``"checkpoint"``
    ``torch.utils.checkpoint`` around each chunk: the backward pass recomputes one chunk's
    logits at a time (one more head matmul). Used where the head's weights are usable only
    inside the module's own call: DeepSpeed ZeRO-3 partitions, sharded DTensors.

None of them holds a (tokens, vocab) tensor; the peak is a few (chunk, vocab) buffers plus
the fp32 gradient of the head's weight (which the plain path needs too). This module is the policy
(which implementation, what chunk size); the kernels are in ``lmtune.model.loss_kernels``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.dist import is_sharded
from lmtune.model.loss_kernels import (
    IDENTITY,
    LogitTransform,
    _checkpointed,
    _checkpointed_token_logps,
    _chunks,
    _head_loss,
    _liger,
    _LinearChunkedCrossEntropy,
    _LinearTokenCrossEntropy,
    _ModuleChunkedCrossEntropy,
)

DEFAULT_LOSS_CHUNK_SIZE = "auto"
# "auto" on accelerators: as many positions per chunk as keep one chunk's fp32 logits at 2**25 values
# (128 MiB): 1,024 positions for a 32k vocabulary, 256 for 128k, 192 for Qwen's 152k, 128 for 256k.
AUTO_CHUNK_LOGITS = 2**25
# "auto" on CPUs: 256 positions (fewer only past a 256k vocabulary, at most 2**26 logits), whatever the
# vocabulary: measured fastest at vocab 32k and 128k, in fp32 and bf16 (smaller chunks stay in the caches
# but make the head's matmuls inefficient; larger ones do not fit them)
CPU_CHUNK_POSITIONS = 256
CPU_CHUNK_LOGITS = 2**26


def auto_chunk_size(vocab_size: int, device: torch.device | str = "cuda") -> int:
    """Positions per loss chunk for a head of ``vocab_size`` outputs on ``device`` (multiples of 64, at least 64)."""
    vocab_size = max(int(vocab_size), 1)
    if torch.device(device).type == "cpu":
        return max(64, min(CPU_CHUNK_POSITIONS, CPU_CHUNK_LOGITS // vocab_size // 64 * 64))
    return max(64, AUTO_CHUNK_LOGITS // vocab_size // 64 * 64)


LOSS_IMPLS = ("liger", "linear", "module", "checkpoint")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position must predict: labels shifted left by one, IGNORE at the end."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_target_tokens(labels: torch.Tensor) -> int:
    """How many positions of a batch carry a loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# the key of a preference batch (``lmtune.dataset.preference``) numbering its sequences: chosen 2k, rejected
# 2k + 1 of pair k, -1 on padding
SEQUENCE_INDEX = "sequence_index"


def loss_units(batch: dict) -> dict[str, int]:
    """What a batch holds of each unit a loss averages over: target ``tokens``; for preference batches also
    ``pairs``, ``chosen_tokens`` (the target tokens of the chosen responses) and ``chosen_all_tokens`` (every
    predicted token of the chosen sequences, prompts included).

    The loop sums them over an optimizer step and all ranks and divides each loss term by its unit's total, so a
    step's loss is the mean over its pairs (tokens) however they are split into micro-batches and ranks.
    """
    if batch.get("targets") is not None:  # a sequence-parallel slice: its targets, already shifted
        return {"tokens": int((batch["targets"] != IGNORE_INDEX).sum())}
    labels = batch["labels"]
    units = {"tokens": count_target_tokens(labels)}
    sequences = batch.get(SEQUENCE_INDEX)
    if sequences is not None:
        units["pairs"] = int(sequences.max()) // 2 + 1 if sequences.numel() else 0
        trained = shifted_targets(labels) != IGNORE_INDEX
        chosen = (sequences % 2 == 0) & (sequences >= 0)
        units["chosen_tokens"] = int((trained & chosen).sum())
        units["chosen_all_tokens"] = int((chosen[:, :-1] & (sequences[:, 1:] == sequences[:, :-1])).sum())
    return units


def sequence_targets(input_ids: torch.Tensor, sequence_index: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Targets predicting every next token inside the ``sequences`` listed (their prompts too), IGNORE elsewhere."""
    same = torch.zeros_like(sequence_index, dtype=torch.bool)
    same[:, :-1] = (sequence_index[:, 1:] == sequence_index[:, :-1]) & torch.isin(sequence_index[:, :-1], sequences)
    nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return torch.where(same, nxt, torch.full_like(input_ids, IGNORE_INDEX))


def causal_lm_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 log-probability of each target under ``logits`` ((tokens, vocab) and (tokens,), no ignored targets)."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def linear_token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       chunk_size: int | str = DEFAULT_LOSS_CHUNK_SIZE,
                       transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """fp32 log-probability of each target under ``transform(head(hidden))``, ``chunk_size`` tokens at a time.

    The sequence-level losses of preference training weigh each token by its sequence's gradient, so they need
    every token's log-probability, not the sum: each chunk is checkpointed (its logits are recomputed in the
    backward pass), and no (tokens, vocab) tensor is ever held. A plain ``nn.Linear`` head that is not trained
    (LoRA, QLoRA) takes the ``"linear"`` kernel instead: each position's gradient is computed in the forward
    pass, so nothing is recomputed.
    """
    if chunk_size == "auto":
        weight = getattr(head, "weight", None)
        chunk_size = auto_chunk_size(getattr(head, "out_features", None)
                                     or (weight.shape[0] if torch.is_tensor(weight) else 0), hidden.device)
    chunk_size = max(int(chunk_size), 1)
    frozen = not any(p.requires_grad for p in head.parameters())
    if frozen and choose_impl(head, hidden.device, transform, liger=False) == "linear":
        return -_LinearTokenCrossEntropy.apply(hidden, head.weight, head.bias, targets, transform, chunk_size)
    return _checkpointed_token_logps(hidden, head, targets, chunk_size, transform)


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the fp32 cross-entropy over positions whose target is not ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# ------------------------------------------------------------------ choosing an implementation

def liger_available() -> bool:
    """Whether Liger Kernel can be imported (it needs Triton and a GPU to run)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _is_plain_tensor(param: torch.Tensor) -> bool:
    """False for DeepSpeed ZeRO-3 partitions and DTensors: weights only usable inside their module's call."""
    return not is_sharded(param)


def choose_impl(head: nn.Module, device: torch.device | str, transform: LogitTransform = IDENTITY,
                liger: bool | None = None) -> str:
    """``"liger"``, ``"linear"``, ``"module"`` or ``"checkpoint"`` for this head on this device (see the module doc).

    ``liger``: whether Liger Kernel may be used (default: whether it is importable).
    """
    device = torch.device(device)
    if not all(_is_plain_tensor(p) for p in head.parameters()):
        return "checkpoint"
    if type(head) is not nn.Linear:
        return "module"
    if liger is None:
        liger = liger_available()
    if liger and device.type == "cuda" and transform.scale == 1.0:
        return "liger"
    return "linear"


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE, transform: LogitTransform = IDENTITY,
                             impl: str | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``transform(head(hidden))`` against ``targets``, ``chunk_size`` tokens at a time.

    ``hidden``: (tokens, hidden_size); ``targets``: (tokens,), ``IGNORE_INDEX`` allowed (pass only the
    positions that carry a loss to save work). ``impl`` forces an implementation (``LOSS_IMPLS``;
    ``"linear"`` and ``"liger"`` need an ``nn.Linear`` head); by default ``choose_impl`` picks one.
    Without gradients to compute, the chunks simply run one after the other under ``no_grad``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (tokens, hidden_size) and targets (tokens,); got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if chunk_size == "auto":
        weight = getattr(head, "weight", None)
        chunk_size = auto_chunk_size(getattr(head, "out_features", None)
                                     or (weight.shape[0] if torch.is_tensor(weight) else 0), hidden.device)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    impl = impl or choose_impl(head, hidden.device, transform)
    if impl not in LOSS_IMPLS:
        raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl in ("linear", "liger") and not isinstance(head, nn.Linear):
        raise ValueError(f"impl={impl!r} needs an nn.Linear head, not {type(head).__name__}")
    if impl == "liger":
        return _liger(hidden, head, targets, transform)
    params = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    if not (torch.is_grad_enabled() and (hidden.requires_grad or params)):
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start, end in _chunks(hidden.shape[0], chunk_size):
                total += _head_loss(head, hidden[start:end], targets[start:end], transform)
            return total
    if impl == "checkpoint":
        return _checkpointed(hidden, head, targets, chunk_size, transform)
    if impl == "linear":
        return _LinearChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, transform, chunk_size)
    return _ModuleChunkedCrossEntropy.apply(hidden, targets, head, transform, chunk_size,
                                            tuple(name for name, _ in params), *(p for _, p in params))
