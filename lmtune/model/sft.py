"""``SupervisedFinetune``: a causal LM (+ bitsandbytes quantization) (+ peft LoRA) and its loss."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from lmtune.config.build import build, is_type_dict
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.device import as_dtype, default_device, warn_once
from lmtune.core.dist import is_sharded
from lmtune.core.errors import ConfigError
from lmtune.model.compile import compile_decoder_layers, compile_options, decoder_layers
from lmtune.model.loss import (
    DEFAULT_LOSS_CHUNK_SIZE,
    LogitTransform,
    causal_lm_loss_sum,
    linear_cross_entropy_sum,
    shifted_targets,
)
from lmtune.model.packed_attention import SEGMENTS_KWARG, segment_bounds, use_packed_sdpa
from lmtune.model.ports import native_target_modules
from lmtune.model.quantization import check_4bit_backend

logger = logging.getLogger("lmtune")


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


def _has_fused_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds MoE experts as fused 3-D weights (transformers 5's Mixtral, DeepSeek...)."""
    return any(type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in module.parameters(False))
               for module in model.modules())


def _keep_4bit_weights_trainable(model: nn.Module) -> None:
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


def _keep_last_layer_activations(causal_lm: nn.Module) -> None:
    """Turn activation checkpointing off in the last checkpointed decoder layer of ``causal_lm``.

    Its backward pass is the first to run, right after the loss: the activations it would
    recompute are then held anyway, so checkpointing it only repeats its forward pass.
    """
    layers = [m for m in decoder_layers(causal_lm) if getattr(m, "gradient_checkpointing", False)]
    if layers:
        layers[-1].gradient_checkpointing = False


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, by transformers 5's name for it where it has one
    (``gradient_checkpointing_enable`` is its deprecated alias there)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
        self.quantized = False
        self.llm = self._build_llm(llm, max_position_embeddings)
        self.llm.config.use_cache = False
        # packed rows: one causal SDPA call per sample instead of a block-diagonal mask over the row
        self.packed_sdpa = use_packed_sdpa(self.llm)
        if tokenizer is not None:
            self._fit_vocab(build(tokenizer, key="model.tokenizer"))
        if self.quantized:
            from peft import prepare_model_for_kbit_training

            self.llm = prepare_model_for_kbit_training(self.llm, use_gradient_checkpointing=False)
            _keep_4bit_weights_trainable(self.llm)
        if use_activation_checkpointing:
            _enable_activation_checkpointing(self.llm)
            _keep_last_layer_activations(self._base_model())
        self.use_lora = lora is not None or peft_model is not None
        if self.use_lora:
            self._add_lora(lora, peft_model)
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
    def _build_llm(self, llm: Any, max_position_embeddings: int | None) -> nn.Module:
        if not is_type_dict(llm):
            return llm
        cfg = dict(llm)
        for flag in ("load_in_8bit", "load_in_4bit"):  # transformers 4 style; transformers 5 wants a config
            if cfg.pop(flag, False) and cfg.get("quantization_config") is None:
                from transformers import BitsAndBytesConfig

                cfg["quantization_config"] = BitsAndBytesConfig(**{flag: True})
        quant = cfg.get("quantization_config")
        if quant is not None:
            quant_obj = build(quant, key="model.llm.quantization_config")
            if getattr(quant_obj, "load_in_4bit", False) or getattr(quant_obj, "load_in_8bit", False):
                self.quantized = True
                check_4bit_backend(self.device.type, getattr(quant_obj, "bnb_4bit_compute_dtype", None))
                if self.device.type == "cuda":
                    cfg.setdefault("device_map", {"": self.device.index or 0})
            cfg["quantization_config"] = quant_obj
        if "torch_dtype" in cfg and "dtype" not in cfg:  # transformers 5 renamed the argument
            cfg["dtype"] = cfg.pop("torch_dtype")
        dtype = cfg.get("dtype")
        if self.device.type == "cpu" and dtype is not None and dtype != "auto" and as_dtype(dtype) == torch.float16:
            warn_once("float16 weights are not trainable on the CPU: loading the model in bfloat16.")
            cfg["dtype"] = torch.bfloat16
        if self.use_varlen_attn and "attn_implementation" not in cfg:
            if _flash_attn_available(self.device):
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
        return model

    def _fit_vocab(self, tokenizer) -> None:
        if len(tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            self.llm.resize_token_embeddings(len(tokenizer))

    def _add_lora(self, lora: Any, peft_model: str | None) -> None:
        from peft import PeftModel, get_peft_model

        from lmtune.model.lora_speed import speed_up_lora_layers  # imports peft: only for LoRA runs

        if peft_model is not None:
            self.llm = PeftModel.from_pretrained(self.llm, peft_model, is_trainable=True)
            speed_up_lora_layers(self.llm)
            return
        lora_cfg = dict(lora) if is_type_dict(lora) else lora
        if isinstance(lora_cfg, dict):
            if lora_cfg.get("target_modules") is None:
                lora_cfg["target_modules"] = find_all_linear_names(self.llm)
            lora_cfg["target_modules"] = native_target_modules(self.llm, lora_cfg["target_modules"])
            lora_cfg = build(lora_cfg, key="model.lora")
        elif getattr(lora_cfg, "target_modules", None) is None:
            lora_cfg.target_modules = find_all_linear_names(self.llm)
        else:
            lora_cfg.target_modules = native_target_modules(self.llm, lora_cfg.target_modules)
        if getattr(lora_cfg, "lora_dropout", 0) and _has_fused_experts(self.llm):
            # transformers 5 fuses MoE experts into 3-D weights; peft adapts them only without dropout
            warn_once(f"{type(self.llm).__name__} keeps its MoE experts fused: LoRA on them needs lora_dropout=0, "
                      f"so lora_dropout={lora_cfg.lora_dropout} is set to 0")
            lora_cfg.lora_dropout = 0.0
        self.llm = get_peft_model(self.llm, lora_cfg)
        speed_up_lora_layers(self.llm)

    def _base_model(self) -> nn.Module:
        model = self.llm
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # -- training --------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **unused: Any) -> dict[str, torch.Tensor]:
        """Summed cross-entropy over target tokens (``loss_sum``), their count, and their mean (``loss``)."""
        targets = shifted_targets(labels)
        loss_sum = None
        if self.loss_chunk_size and self._chunked_loss_ok is not False:
            loss_sum = self._chunked_loss(input_ids, targets, position_ids, attention_mask)
        if loss_sum is None:
            loss_sum = self._plain_loss(input_ids, targets, position_ids, attention_mask)
        num_tokens = (targets != IGNORE_INDEX).sum()
        return {"loss_sum": loss_sum, "num_tokens": num_tokens, "loss": loss_sum / num_tokens.clamp(min=1)}

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
        """The sample boundaries of packed rows, for ``PACKED_SDPA`` (none without packing or with a mask)."""
        if not self.packed_sdpa or position_ids is None or attention_mask is not None:
            return {}
        bounds = segment_bounds(position_ids)
        return {} if bounds is None else {SEGMENTS_KWARG: bounds}

    def _chunked_loss(self, input_ids, targets, position_ids, attention_mask) -> torch.Tensor | None:
        """The loss over the head's output in chunks; None where this model needs the plain path.

        The whole model runs (so wrappers' hooks, FSDP and ZeRO-3 gathering work as usual), but
        a pre-hook on the output head takes the final hidden states and hands the head none of
        them (a few on the first call, to check that ``LogitTransform`` reproduces what the model
        does to its logits). ``linear_cross_entropy_sum`` then runs the head on the labelled
        positions only, a chunk at a time.
        """
        base = self._base_model()
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
            out = self.llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
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
        del out
        mask = targets != IGNORE_INDEX
        return linear_cross_entropy_sum(hidden[mask], head, targets[mask], self.loss_chunk_size,
                                        self._logit_transform)

    def _give_up_chunking(self, why: str) -> None:
        self._chunked_loss_ok = False
        warn_once(f"{type(self._base_model()).__name__}: the chunked loss is off ({why}); the loss is computed "
                  "on the full logits instead (more memory).")
        return None

    @torch.no_grad()
    def packing_leak(self, segment: int = 8) -> float:
        """How much the logits of a packed sample change because another sample precedes it.

        Two samples are packed into one row (positions restarting at the second)
        and the second is also run alone. With attention that keeps packed samples
        apart the difference is float noise; a model whose attention ignores the
        restart (some remote-code models do) lets the second sample see the first.
        Returns the largest difference relative to the mean logit magnitude, less
        four times the rounding noise of the dtype: the difference between the
        sample alone and the same sample followed by the other one (which causal
        attention must not see either). In fp32 that noise is ~1e-7; in bf16 it
        reaches a few percent of a random model's small logits, which a real leak
        exceeds by far.
        """
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            vocab = self.llm.get_input_embeddings().num_embeddings
            first = torch.arange(3, 3 + segment, device=device) % vocab
            second = torch.arange(11, 11 + segment, device=device) % vocab
            packed_ids = torch.cat([first, second])[None]
            positions = torch.cat([torch.arange(segment), torch.arange(segment)]).to(device)[None]
            packed = self.llm(input_ids=packed_ids, position_ids=positions, use_cache=False,
                              **self._attention_kwargs(positions, None)).logits[0, segment:]
            alone = self.llm(input_ids=second[None], position_ids=positions[:, :segment],
                             use_cache=False).logits[0]
            followed = self.llm(input_ids=torch.cat([second, first])[None],
                                position_ids=torch.arange(2 * segment, device=device)[None],
                                use_cache=False).logits[0, :segment]
            packed, alone, followed = packed.float(), alone.float(), followed.float()
            scale = alone.abs().mean().clamp(min=1e-6)
            leak = float((packed - alone).abs().max() / scale)
            noise = float((followed - alone).abs().max() / scale)
            return max(0.0, leak - 4 * noise)
        finally:
            self.train(was_training)

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
