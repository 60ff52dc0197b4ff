"""FLOPs of a training step, counted from the model's own modules.

What is counted (a multiply-add is 2 FLOPs):

- every matrix multiply by a weight: ``nn.Linear`` (bitsandbytes' 4/8-bit ones too, by
  their ``in_features x out_features``), GPT-2's ``Conv1D``, LoRA's ``lora_A``/``lora_B``
  (active adapters only; PEFT's ``modules_to_save`` copies: the active copy only), other
  2-D parameters outside embeddings (MoE routers), and stacked mixture-of-experts weights
  (3-D parameters, ``num_experts_per_tok`` of the experts per token): forward
  ``2 * params`` per token;
- the output head only on the positions that have a label: that is all the loss computes
  (``SupervisedFinetune`` runs the head on labelled positions only);
- attention scores and their weighted sum, per attention layer and sample:
  ``2 * pairs * (width_qk + width_v)``, where a sample of ``s`` tokens has ``s * s`` query/key
  pairs, or ``s * (s + 1) / 2`` when attention is causal (the work a causal kernel does;
  a sliding window of ``w`` caps each query at ``w`` keys). So non-causal attention costs
  ``2 * 2 * s * hidden`` per token and layer, causal about half of it. Samples packed into
  one row count separately (their attention restarts), padding not at all;
- embedding lookups, norms, activations, rotary embeddings, softmax: not counted.

The backward pass costs ``2 * params`` per token for the input gradient of every weight
and another ``2 * params`` for the weight gradient of trainable weights only. So full
fine-tuning costs 3x the forward pass, while frozen weights (LoRA/QLoRA's base model)
cost 2x; attention's backward is 2x its forward. Layers under activation checkpointing
run their forward pass once more in the backward pass (the head is never recomputed).
The matmuls below the first trainable weight, whose input gradient autograd skips, are
counted anyway.

``sample_lengths`` reads the per-sample lengths of a collated batch, without its padding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lmtune.core.constants import IGNORE_INDEX

_ATTENTION_NAME = re.compile(r"Attention\d*$")


@dataclasses.dataclass
class MatmulParams:
    """Weights touched per token, split by what their backward pass costs."""

    trainable: int = 0
    frozen: int = 0
    recomputed: int = 0  # the part (trainable or not) inside activation-checkpointed layers

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
    width_qk: int  # query heads x head dim of the scores
    width_v: int  # query heads x head dim of the values
    causal: bool = True
    window: int | None = None
    recomputed: bool = False

    def pairs(self, length: int) -> int:
        """Query/key pairs a sample of ``length`` tokens computes."""
        if not self.causal:
            return length * length
        w = self.window
        if w is None or length <= w:
            return length * (length + 1) // 2
        return w * (w + 1) // 2 + (length - w) * w

    def forward_flops(self, lengths: Iterable[int]) -> int:
        return 2 * (self.width_qk + self.width_v) * sum(self.pairs(n) for n in lengths)


def _base_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "llm", model)  # SupervisedFinetune
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _active_adapters(module: nn.Module) -> list[str]:
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", None)
    if isinstance(names, str):
        return [names]
    return list(names or [])


def _matmul_size(module: nn.Module) -> int | None:
    """``in x out`` of a linear-like leaf module, or None."""
    if isinstance(module, nn.Linear):
        return int(module.in_features) * int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx) * int(module.nf)
    return None


def _trainable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return bool(weight is not None and weight.requires_grad)


def _top_k(config: Any) -> int | None:
    for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class FlopCounter:
    """FLOPs of the forward pass and of a training step of ``model`` (see the module doc).

    ``model``: a ``SupervisedFinetune``, a PEFT model or a causal LM. ``causal``: force causal
    (True) or full (False) attention; by default each attention module's ``is_causal`` (True
    if it has none). ``activation_checkpointing``: force whether decoder layers are
    recomputed; by default the layers whose ``gradient_checkpointing`` flag is set are.
    """

    def __init__(self, model: nn.Module, causal: bool | None = None,
                 activation_checkpointing: bool | None = None) -> None:
        base = _base_model(model)
        self.config = getattr(base, "config", None)
        text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.text_config = text_config
        self._causal = causal
        self._force_ckpt = activation_checkpointing
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self._head = head if isinstance(head, nn.Module) else None
        self._top_k = _top_k(text_config) if text_config is not None else None
        self.body = MatmulParams()
        self.head = MatmulParams()
        self.attention: list[AttentionLayer] = []
        self._visit(base, in_head=False, recomputed=False)
        if not self.attention and text_config is not None:
            self._attention_from_config(text_config)
        self.any_trainable = any(p.requires_grad for p in model.parameters())

    # -- reading the modules ------------------------------------------------
    def _checkpointed(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer that activation checkpointing recomputes."""
        if not getattr(module, "gradient_checkpointing", False) or isinstance(module, nn.ModuleList):
            return False
        # the flag is also set on the model that holds the layers: only the innermost carrier counts
        return not any(hasattr(m, "gradient_checkpointing") for m in module.modules() if m is not module)

    def _add(self, counts: MatmulParams, size: int, trainable: bool, recomputed: bool) -> None:
        if trainable:
            counts.trainable += size
        else:
            counts.frozen += size
        if recomputed:
            counts.recomputed += size

    def _visit(self, module: nn.Module, in_head: bool, recomputed: bool) -> None:
        in_head = in_head or module is self._head
        if self._force_ckpt is None:
            recomputed = recomputed or self._checkpointed(module)
        else:  # forced: everything but the head
            recomputed = self._force_ckpt and not in_head
        counts = self.head if in_head else self.body
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):  # PEFT modules_to_save
            active = [module.modules_to_save[n] for n in _active_adapters(module) if n in module.modules_to_save]
            for child in active or [module.original_module]:
                self._visit(child, in_head, recomputed)
            return
        if hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):  # LoRA
            self._visit(module.base_layer, in_head, recomputed)
            for name in _active_adapters(module):
                for part in ("lora_A", "lora_B"):
                    if name in getattr(module, part):
                        self._visit(getattr(module, part)[name], in_head, recomputed)
            return
        size = _matmul_size(module)
        if size is not None:
            self._add(counts, size, _trainable(module), recomputed)
            return
        for param in module.parameters(recurse=False):
            shape = tuple(getattr(param, "ds_shape", None) or param.shape)  # a ZeRO-3 partition: its full shape
            if len(shape) == 3:  # stacked experts: each token runs top_k of them
                share = min(self._top_k or shape[0], shape[0])
                self._add(counts, shape[1] * shape[2] * share, param.requires_grad, recomputed)
            elif len(shape) == 2 and not isinstance(module, nn.Embedding):  # a weight used by F.linear (routers)
                self._add(counts, shape[0] * shape[1], param.requires_grad, recomputed)
        is_attention = (not in_head and not self._in_attention
                        and _ATTENTION_NAME.search(type(module).__name__) is not None)
        if is_attention:  # the outermost module named like an attention layer
            self._add_attention(module, recomputed)
            self._in_attention = True
        try:
            for child in module.children():
                self._visit(child, in_head, recomputed)
        finally:
            if is_attention:
                self._in_attention = False

    _in_attention = False

    def _config_width(self) -> tuple[int, int] | None:
        cfg = self.text_config
        heads = getattr(cfg, "num_attention_heads", None)
        hidden = getattr(cfg, "hidden_size", None)
        if not heads or not hidden:
            return None
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return heads * head_dim, heads * head_dim

    def _add_attention(self, module: nn.Module, recomputed: bool) -> None:
        def features(names: Sequence[str], attr: str) -> int | None:
            for name in names:
                child = getattr(module, name, None)
                value = getattr(child, attr, None)
                if isinstance(value, int):
                    return value
            return None

        width_qk = features(("q_proj", "query", "q", "wq"), "out_features")
        width_v = features(("o_proj", "out_proj", "dense", "wo"), "in_features")
        fallback = self._config_width()
        if width_qk is None or width_v is None:
            if fallback is None:
                return
            width_qk, width_v = width_qk or fallback[0], width_v or fallback[1]
        causal = self._causal if self._causal is not None else bool(getattr(module, "is_causal", True))
        window = getattr(module, "sliding_window", None)
        self.attention.append(AttentionLayer(width_qk, width_v, causal, window if isinstance(window, int) else None,
                                             recomputed))

    def _attention_from_config(self, cfg: Any) -> None:
        width = self._config_width()
        layers = getattr(cfg, "num_hidden_layers", None)
        if width is None or not layers:
            return
        causal = True if self._causal is None else self._causal
        recomputed = self._force_ckpt if self._force_ckpt is not None else self.body.recomputed > 0
        self.attention = [AttentionLayer(width[0], width[1], causal, None, recomputed) for _ in range(layers)]

    # -- counting -----------------------------------------------------------
    def forward_flops(self, lengths: Sequence[int], target_tokens: int | None = None) -> float:
        """FLOPs of one forward pass over samples of these lengths (the head over ``target_tokens``,
        or over every token when None)."""
        tokens = sum(lengths)
        head_tokens = tokens if target_tokens is None else target_tokens
        flops = 2 * self.body.total * tokens + 2 * self.head.total * head_tokens
        return float(flops + sum(layer.forward_flops(lengths) for layer in self.attention))

    def step_flops(self, lengths: Sequence[int], target_tokens: int | None = None) -> float:
        """FLOPs of a training step (forward, backward, recompute) over samples of these lengths."""
        tokens = sum(lengths)
        head_tokens = tokens if target_tokens is None else target_tokens
        forward = self.forward_flops(lengths, target_tokens)
        if not self.any_trainable:
            return forward
        # input gradients of every weight, weight gradients of the trainable ones
        backward = ((2 * self.body.total + 2 * self.body.trainable) * tokens
                    + (2 * self.head.total + 2 * self.head.trainable) * head_tokens)
        recompute = 2 * self.body.recomputed * tokens + 2 * self.head.recomputed * head_tokens
        for layer in self.attention:
            attention = layer.forward_flops(lengths)
            backward += 2 * attention
            if layer.recomputed:
                recompute += attention
        return float(forward + backward + recompute)

    def batch_flops(self, batch: dict) -> float:
        """``step_flops`` of a collated batch (``input_ids``, ``labels``, optional ``position_ids``)."""
        return self.step_flops(sample_lengths(batch), count_targets(batch))

    def describe(self) -> str:
        parts = [f"matmul weights per token: {self.body.total:,} ({self.body.trainable:,} trainable)",
                 f"head: {self.head.total:,} ({self.head.trainable:,} trainable)",
                 f"attention layers: {len(self.attention)}"]
        if any(layer.recomputed for layer in self.attention) or self.body.recomputed:
            parts.append("activation checkpointing: recomputed forward counted")
        return "; ".join(parts)


# ------------------------------------------------------------------ batches

def count_targets(batch: dict) -> int:
    """Positions of a batch that carry a loss (labels shifted by one)."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _segments(positions: torch.Tensor) -> list[int]:
    """Lengths of the runs of a row's position ids that restart at 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], positions.shape[0]]
    return [e - s for s, e in zip(starts, ends)]


def _is_padding(ids: torch.Tensor, labels: torch.Tensor) -> bool:
    """A run of one repeated token id with no label anywhere: what collating pads a row with."""
    return bool(ids.numel()) and bool((labels == IGNORE_INDEX).all()) and bool((ids == ids[0]).all())


def sample_lengths(batch: dict) -> list[int]:
    """Lengths of the samples of a collated batch, padding left out.

    A row's samples are the runs of its ``position_ids`` that restart at 0 (packed rows); without
    position ids the row is one sample. Padding is the ``attention_mask``'s zeros when the batch
    has one; otherwise a row's trailing run (or trailing restarted segment) of a single repeated
    token id with no labels, which is what ``default_collate_fn`` appends.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    positions = batch.get("position_ids")
    mask = batch.get("attention_mask")
    lengths: list[int] = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row]
        row_labels = labels[row] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
        if torch.is_tensor(mask) and mask.dim() == 2:
            keep = int(mask[row].sum())
            segments = _segments(positions[row][mask[row].bool()]) if torch.is_tensor(positions) else [keep]
            lengths.extend(n for n in segments if n)
            continue
        if torch.is_tensor(positions):
            segments = _segments(positions[row])
            if len(segments) > 1:
                start = ids.shape[0] - segments[-1]
                if _is_padding(ids[start:], row_labels[start:]):
                    segments = segments[:-1]
            lengths.extend(n for n in segments if n)
            continue
        n = ids.shape[0]
        last = ids[-1]
        run = n
        while run > 0 and ids[run - 1] == last and row_labels[run - 1] == IGNORE_INDEX:
            run -= 1
        lengths.append(run if run > 0 else n)
    return lengths
