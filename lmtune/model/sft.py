"""``SupervisedFinetune``: a causal LM (+ bitsandbytes quantization) (+ peft LoRA) and its loss."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from lmtune.config.build import build
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.device import default_device, warn_once
from lmtune.core.dist import is_sharded
from lmtune.core.errors import ConfigError
from lmtune.model.build import (
    add_lora,
    build_llm,
    enable_activation_checkpointing,
    keep_4bit_weights_trainable,
    keep_last_layer_activations,
)
from lmtune.model.compile import compile_decoder_layers, compile_options
from lmtune.model.diagnostics import packing_leak
from lmtune.model.loss import (
    DEFAULT_LOSS_CHUNK_SIZE,
    LogitTransform,
    causal_lm_loss_sum,
    linear_cross_entropy_sum,
    shifted_targets,
)
from lmtune.model.packed_attention import SEGMENTS_KWARG, SEQUENCE_PARALLEL_KWARG, segment_bounds, use_packed_sdpa

logger = logging.getLogger("lmtune")


class SupervisedFinetune(nn.Module):
    """The model being fine-tuned.

    ``llm``: a model or ``dict(type=AutoModelForCausalLM.from_pretrained, ...)``;
    with ``quantization_config`` (bitsandbytes 4-bit) it is loaded quantized.
    ``lora``: a ``LoraConfig`` (or its dict) to train LoRA adapters, or None for
    full fine-tuning; ``target_modules`` left unset means every linear layer but
    the output head. ``use_activation_checkpointing`` recomputes activations in
    the backward pass to save memory. ``use_varlen_attn`` selects
    variable-length flash attention when flash-attn and a GPU are present
    (packed samples are kept apart either way).

    ``forward`` returns the summed token loss and the number of target tokens,
    so the loop can average over every token of an optimizer step.

    ``loss_chunk_size``: the loss runs the output head over the positions that
    have a label, this many tokens at a time (``lmtune.model.loss``), so the
    logits of all tokens are never held at once, in the forward or the backward
    pass. ``"auto"`` (the default): on accelerators, 128 MiB of fp32 logits per
    chunk (1,024 positions at vocab 32k, 256 at 128k); on CPUs, 256 positions
    (the fastest there, at 32k and 128k). ``None`` or 0:
    the model computes the logits of every labelled position in one go (more
    memory; same loss up to float rounding).

    ``torch_compile``: ``True`` (or a dict of ``torch.compile`` options such as
    ``mode`` or ``backend``) compiles each decoder layer (``lmtune.model.compile``).
    Off by default: compiling costs time at the start and its gain depends on the
    hardware (docs/benchmarks.md).
    """

    def __init__(self, llm: Any, lora: Any = None, peft_model: str | None = None,
                 use_activation_checkpointing: bool = True, use_varlen_attn: bool = False,
                 tokenizer: Any = None, max_position_embeddings: int | None = None,
                 loss_chunk_size: int | str | None = DEFAULT_LOSS_CHUNK_SIZE,
                 torch_compile: bool | dict | None = False) -> None:
        super().__init__()
        compile_with = compile_options(torch_compile)
        if loss_chunk_size not in (None, "auto") and (isinstance(loss_chunk_size, bool)
                                                      or not isinstance(loss_chunk_size, int) or loss_chunk_size < 0):
            raise ConfigError(f"model.loss_chunk_size must be 'auto', a positive integer, or 0/None for the plain "
                              f"loss; got {loss_chunk_size!r}")
        self.loss_chunk_size = loss_chunk_size if loss_chunk_size == "auto" else int(loss_chunk_size or 0)
        # None: the chunked loss is not yet checked against this model's own logits; then True or False
        self._chunked_loss_ok: bool | None = None
        self.device = default_device()
        self.use_varlen_attn = use_varlen_attn
        self.llm, self.quantized = build_llm(llm, max_position_embeddings, self.device, use_varlen_attn)
        self.llm.config.use_cache = False
        # packed rows: one causal SDPA call per sample instead of a block-diagonal mask over the row
        self.packed_sdpa = use_packed_sdpa(self.llm)
        if tokenizer is not None:
            self._fit_vocab(build(tokenizer, key="model.tokenizer"))
        if self.quantized:
            from peft import prepare_model_for_kbit_training

            self.llm = prepare_model_for_kbit_training(self.llm, use_gradient_checkpointing=False)
            keep_4bit_weights_trainable(self.llm)
        if use_activation_checkpointing:
            enable_activation_checkpointing(self.llm)
            keep_last_layer_activations(self._base_model())
        self.use_lora = lora is not None or peft_model is not None
        if self.use_lora:
            self.llm = add_lora(self.llm, lora, peft_model)
        else:
            if self.quantized:
                raise ConfigError("a 4-bit quantized model can only be fine-tuned with LoRA: add a lora=dict(...) "
                                  "to the model, or set model.llm.quantization_config=None for full fine-tuning")
            for param in self.llm.parameters():  # fp32 master weights for mixed precision
                if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
        self._keeps_logits = "logits_to_keep" in inspect.signature(self._base_model().forward).parameters
        self._logit_transform = LogitTransform.from_config(getattr(self._base_model(), "config", None))
        self.compiled_layers = 0 if compile_with is None else compile_decoder_layers(self._base_model(), compile_with)

    # -- construction ----------------------------------------------------
    def _fit_vocab(self, tokenizer) -> None:
        if len(tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            self.llm.resize_token_embeddings(len(tokenizer))

    def _base_model(self) -> nn.Module:
        model = self.llm
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # -- training --------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, **unused: Any) -> dict[str, torch.Tensor]:
        """Summed cross-entropy over target tokens (``loss_sum``), their count, and their mean (``loss``).

        ``targets`` (instead of ``labels``): the next-token targets of each position, already shifted, as a
        sequence-parallel slice of a row carries them (``SEQUENCE_PARALLEL_KWARG`` then says how the slice's
        attention reaches the whole row)."""
        if targets is None:
            targets = shifted_targets(labels)
        self._sequence_parallel = unused.get(SEQUENCE_PARALLEL_KWARG)
        try:
            loss_sum = self._chunked_loss(input_ids, targets, position_ids, attention_mask)
            if loss_sum is None:
                loss_sum = self._plain_loss(input_ids, targets, position_ids, attention_mask)
        finally:
            self._sequence_parallel = None
        num_tokens = (targets != IGNORE_INDEX).sum()
        return {"loss_sum": loss_sum, "num_tokens": num_tokens, "loss": loss_sum / num_tokens.clamp(min=1)}

    def last_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits after each row's last input token (``(rows, vocab)``): what a multiple-choice
        evaluator reads. One forward over the batch (right-padded rows: a real token never sees the padding
        after it); the output head runs only on the rows' last positions when the model can be told so."""
        rows = input_ids.shape[0]
        lengths = (attention_mask.bool().sum(dim=1) if attention_mask is not None
                   else torch.full((rows,), input_ids.shape[1], device=input_ids.device))
        last = (lengths - 1).clamp(min=0)
        if self._keeps_logits:
            positions = torch.unique(last)  # sorted
            logits = self.llm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
            return logits[torch.arange(rows, device=logits.device), torch.searchsorted(positions, last)]
        logits = self.llm(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[torch.arange(rows, device=logits.device), last]

    def _plain_loss(self, input_ids, targets, position_ids, attention_mask) -> torch.Tensor:
        """The model computes the logits of every position that has a label (of any row), then the loss."""
        kwargs: dict[str, Any] = {}
        if self._keeps_logits:
            keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
            kwargs["logits_to_keep"] = keep
            targets = targets[:, keep]
        out = self.llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       use_cache=False, **kwargs, **self._attention_kwargs(position_ids, attention_mask))
        return causal_lm_loss_sum(out.logits, targets)

    def _attention_kwargs(self, position_ids, attention_mask) -> dict[str, Any]:
        """The sample boundaries of packed rows, for ``PACKED_SDPA`` (none without packing or with a mask); under
        sequence parallelism, the whole rows' boundaries and the group."""
        parallel = getattr(self, "_sequence_parallel", None)
        if parallel is not None:
            return {SEQUENCE_PARALLEL_KWARG: parallel}
        if not self.packed_sdpa or position_ids is None or attention_mask is not None:
            return {}
        bounds = segment_bounds(position_ids)
        return {} if bounds is None else {SEGMENTS_KWARG: bounds}

    def _chunked_loss(self, input_ids, targets, position_ids, attention_mask) -> torch.Tensor | None:
        """The loss over the head's output in chunks; None where this model needs the plain path."""
        found = self._final_hidden(self.llm, input_ids, position_ids, attention_mask)
        if found is None:
            return None
        hidden, head = found
        mask = targets != IGNORE_INDEX
        return linear_cross_entropy_sum(hidden[mask], head, targets[mask], self.loss_chunk_size,
                                        self._logit_transform)

    def _final_hidden(self, llm, input_ids, position_ids, attention_mask) -> tuple[torch.Tensor, nn.Module] | None:
        """``llm``'s final hidden states and its output head, for a loss computed in chunks; None where this
        model needs the plain path.

        The whole model runs (so wrappers' hooks, FSDP and ZeRO-3 gathering work as usual), but
        a pre-hook on the output head takes the final hidden states and hands the head none of
        them (a few on the first call, to check that ``LogitTransform`` reproduces what the model
        does to its logits). The caller then runs the head on the labelled positions only
        (``linear_cross_entropy_sum``, ``linear_token_logps``), a chunk at a time. None at once when the
        chunked loss is off (``loss_chunk_size`` 0, or this model found unfit for it).
        """
        if not self.loss_chunk_size or self._chunked_loss_ok is False:
            return None
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            return self._give_up_chunking("the model has no output head module")
        weight = getattr(head, "weight", None)
        if is_sharded(weight):
            # FSDP2 / ZeRO-3 gather the head's weight only inside the model's own forward
            return self._give_up_chunking("its output head is sharded (FSDP2 or ZeRO-3)")
        batch, seq = input_ids.shape
        probe = 0 if self._chunked_loss_ok else min(4, seq)
        seen: dict[str, Any] = {"calls": 0}

        def take_hidden(module, args, kwargs):
            seen["calls"] += 1
            hidden = args[0] if args else kwargs.get("input")
            if seen["calls"] > 1 or not torch.is_tensor(hidden) or tuple(hidden.shape[:2]) != (batch, seq):
                return None
            seen["hidden"] = hidden
            if args:
                return (hidden[:, :probe], *args[1:]), kwargs
            return args, {**kwargs, "input": hidden[:, :probe]}

        handle = head.register_forward_pre_hook(take_hidden, with_kwargs=True)
        try:
            out = llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **self._attention_kwargs(position_ids, attention_mask))
        finally:
            handle.remove()
        hidden = seen.get("hidden")
        if hidden is None or seen["calls"] != 1:
            return self._give_up_chunking("its output head is not called once on the final hidden states")
        if probe:
            with torch.no_grad():
                expected = out.logits.detach().float()
                mine = self._logit_transform(head(hidden[:, :probe].detach()))
                close = expected.shape == mine.shape and bool(
                    (expected - mine).abs().max() <= 1e-2 * max(1.0, float(expected.abs().max())))
            if not close:
                return self._give_up_chunking("it transforms its logits in a way lmtune does not reproduce")
            self._chunked_loss_ok = True
        return hidden, head

    def _give_up_chunking(self, why: str) -> None:
        self._chunked_loss_ok = False
        warn_once(f"{type(self._base_model()).__name__}: the chunked loss is off ({why}); the loss is computed "
                  "on the full logits instead (more memory).")
        return None

    def packing_leak(self, segment: int = 8) -> float:
        """How much a packed sample's logits change because another precedes it (``model.diagnostics``)."""
        return packing_leak(self, segment)

    # -- checkpoints -----------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: only what is trained (adapters for LoRA/QLoRA)."""
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True,
                                  assign: bool = False) -> None:
        """Load checkpoint weights. ``assign=True`` fills a model built with its parameters on the meta
        device: every parameter must be in ``state``, and tied weights are tied again afterwards."""
        if assign:
            self._base_model().tie_weights()
        own = dict(self.named_parameters())
        if assign:
            missing = [n for n in own if n not in state]
            if missing:
                raise ConfigError(f"checkpoint lacks {len(missing)} weights of the model ({missing[:3]}): "
                                  "it was not saved from a full fine-tuning run of this config")
            self.load_state_dict({n: state[n] for n in own}, strict=False, assign=True)
            self._base_model().tie_weights()
            still_empty = [n for n, p in self.named_parameters() if p.is_meta]
            if still_empty:
                raise ConfigError(f"weights left unset after loading the checkpoint: {still_empty[:3]}")
            return
        missing = [n for n, p in own.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in own]
        if strict and (missing or unexpected):
            raise ConfigError(f"checkpoint does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (was it saved from another config?)")
        with torch.no_grad():
            for name, value in state.items():
                if name in own:
                    own[name].copy_(value.to(own[name].dtype))
