"""DeepSeek-MoE (v1: deepseek-moe-16b-base / -chat, ``model_type: deepseek``) on transformers' Llama blocks.

The hub code (``modeling_deepseek.py``) is Llama (multi-head attention with RoPE and optional biases, RMSNorm,
SwiGLU) whose feed-forward block is, in layer ``i``, a mixture of experts when ``n_routed_experts`` is set,
``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0`` (else Llama's dense MLP):

- a router ``mlp.gate.weight`` ``[n_routed_experts, hidden]``: softmax of ``h @ W.T`` (in the input's dtype), the
  ``num_experts_per_tok`` largest scores as the token's experts (greedy top-k), their scores as weights, divided by
  their sum when ``norm_topk_prob`` (and k > 1);
- ``n_routed_experts`` SwiGLU experts of width ``moe_intermediate_size``, ``mlp.experts.N.{gate,up,down}_proj``;
  lmtune holds them fused, as transformers 5 holds MoE experts (DeepSeek-V2's ``DeepseekV2Experts``:
  ``experts.gate_up_proj`` ``[E, 2 * I, H]`` and ``experts.down_proj`` ``[E, H, I]``), joined on load and split
  back under the hub names on save (transformers' ``MergeModulelist`` / ``Concatenate``);
- shared experts ``mlp.shared_experts.{gate,up,down}_proj``, one SwiGLU of width ``n_shared_experts *
  moe_intermediate_size`` that every token goes through (none when ``n_shared_experts`` is null).

DeepSeek-V2's own MoE block (``DeepseekV2Moe``) is not the same computation: its router always runs in fp32,
never renormalises the top-k weights (it scales them by ``routed_scaling_factor``) and has no balance loss; so
the router and the block are lmtune's (``DeepseekMoeRouter``, ``DeepseekMoeBlock``) around transformers' fused
experts and MLP, in Llama's model classes (``DeepseekMoeNativeModel`` / ``DeepseekMoeNativeForCausalLM``). The
fused experts run with any of transformers' experts implementations (``experts_implementation``: grouped_mm, the
default, batched_mm or eager).

Training: the load-balancing loss. In train mode with ``aux_loss_alpha > 0`` the hub code computes, per MoE
layer, ``alpha * sum_e f_e * P_e``, with ``P_e`` the mean router score of expert ``e`` and ``f_e`` the share of
the top-k choices that went to ``e`` times ``n_routed_experts / k`` -- per row of the batch and then averaged
when ``seq_aux`` (deepseek-moe-16b), over all tokens otherwise -- and adds its gradient to the backward pass
without adding it to the loss (``AddAuxiliaryLoss``: the loss reported is the cross-entropy alone). lmtune does
the same in the model (``with_aux_gradient``), so any trainer, lmtune's ``SupervisedFinetune`` included, gets the
hub code's gradients: every forward pass in train mode contributes ``d(aux)/d(theta)`` once, whatever the loss's
scaling, as with the hub code: with gradient accumulation each micro-batch adds its own (``accumulative_counts``
of them per step), and fp16 loss scaling (``GradScaler``) does not scale it, so unscaling divides it by the scale
(the balance term then all but vanishes, with the hub code under XTuner as here; bf16 and fp32 keep it). As there, a
packed row is one sequence to the per-row statistics (the hub code knows nothing of packing), padding tokens
count, and the balance loss flows into every weight upstream of the routers, not just the routers. Eval mode
and ``aux_loss_alpha: 0`` give plain gradients. The router logits are not returned (``output_router_logits``
has no effect; transformers' Mixtral-style ``router_aux_loss_coef`` loss is not what this model trains with).

Not reproduced: ``pretraining_tp > 1`` (the hub code's sliced matmuls: the same result up to rounding);
``scoring_func`` other than softmax (the hub code raises too); the hub's dynamic NTK RoPE keeps a scaled base
after a long input for later short ones, transformers recomputes it per call (the same for any one input).

LoRA: the attention projections, the dense layers' and the shared experts' MLPs are ``nn.Linear`` and take LoRA
as in the hub code. The routed experts are 3-D tensors: a hub LoRA config naming ``gate_proj`` / ``up_proj`` /
``down_proj`` (in the hub code also the routed experts' linears) reaches, here, the dense and shared-expert
layers; peft adapts the fused routed experts only through ``target_parameters`` (and without dropout). The
router is no ``nn.Linear`` in either (``find_all_linear_names`` skips it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts, DeepseekV2MLP

from lmtune.core.errors import ConfigError
from lmtune.model.ports.layout import HubLayoutMixin
from lmtune.model.ports.llama_like import llama_kwargs

# the hub configuration's defaults for keys a config.json may leave out
HUB_DEFAULTS = dict(moe_intermediate_size=1407, n_shared_experts=None, n_routed_experts=None,
                    num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0, norm_topk_prob=False,
                    scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True)


@strict
class DeepseekMoeNativeConfig(LlamaConfig):
    """``LlamaConfig`` plus DeepSeek-MoE's mixture-of-experts keys (the hub config's names and defaults)."""

    model_type = "deepseek"

    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True

    @property
    def num_experts(self) -> int | None:  # the name transformers' experts module reads
        return self.n_routed_experts

    def is_moe_layer(self, index: int) -> bool:
        return (self.n_routed_experts is not None and index >= self.first_k_dense_replace
                and index % self.moe_layer_freq == 0)


# ------------------------------------------------------------------ the balance loss's gradient

class _AuxGradient(torch.autograd.Function):
    """Identity on ``x``; in the backward pass the auxiliary loss gets gradient 1 (it is added to the objective
    without being added to the loss that is returned)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def with_aux_gradient(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``x`` itself, with ``aux``'s gradient joining the backward pass through it (the hub's ``AddAuxiliaryLoss``)."""
    if not aux.requires_grad:
        return x
    return _AuxGradient.apply(x, aux)


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, alpha: float, per_row: bool) -> torch.Tensor:
    """DeepSeek-MoE's expert-level balance loss. ``scores``: ``[tokens, experts]`` router probabilities,
    ``indices``: ``[tokens, k]`` the chosen experts, tokens in ``batch`` rows of equal length.

    ``alpha * sum_e f_e * P_e`` with ``P_e`` the mean score of expert ``e`` and ``f_e = experts / k * (share of the
    choices that went to e)``, per row then averaged over the rows (``per_row``, DeepSeek's ``seq_aux``), or over
    all tokens at once. The choice counts are constants (no gradient); the scores carry it."""
    experts = scores.shape[-1]
    if per_row:
        chosen = indices.reshape(batch, -1)
        counts = torch.zeros(batch, experts, device=scores.device, dtype=torch.float32)
        counts.scatter_add_(1, chosen, torch.ones(chosen.shape, device=scores.device, dtype=torch.float32))
        load = counts / (chosen.shape[1] / experts)
        return (load * scores.reshape(batch, -1, experts).mean(1)).sum(1).mean() * alpha
    load = F.one_hot(indices.reshape(-1), num_classes=experts).float().mean(0) * experts
    return (scores.mean(0) * load).sum() * alpha


# ------------------------------------------------------------------ the mixture-of-experts block

class DeepseekMoeRouter(nn.Module):
    """DeepSeek-MoE's router (the hub's ``MoEGate``): softmax scores, greedy top-k, optional renormalisation, and
    the balance loss in train mode."""

    def __init__(self, config: DeepseekMoeNativeConfig) -> None:
        super().__init__()
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.alpha = float(config.aux_loss_alpha)
        self.seq_aux = bool(config.seq_aux)
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``[batch, seq, hidden]`` -> top-k weights and expert indices ``[batch * seq, k]``, and the balance loss
        (None outside training)."""
        batch = hidden_states.shape[0]
        logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        aux = None
        if self.training and self.alpha > 0.0:
            aux = balance_loss(scores, indices, batch, self.alpha, self.seq_aux)
        return weights, indices, aux


class DeepseekMoeBlock(nn.Module):
    """A DeepSeek-MoE feed-forward block: the routed experts (transformers' fused ``DeepseekV2Experts``) weighted
    by the router, plus the shared experts, if any, for every token."""

    def __init__(self, config: DeepseekMoeNativeConfig) -> None:
        super().__init__()
        self.gate = DeepseekMoeRouter(config)
        self.experts = DeepseekV2Experts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size
                                                * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        weights, indices, aux = self.gate(hidden_states)
        out = self.experts(hidden_states.reshape(-1, shape[-1]), indices, weights).view(shape)
        if aux is not None:
            out = with_aux_gradient(out, aux)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


# ------------------------------------------------------------------ the model

class _MoeParts:
    """What the MoE blocks need of the model classes: their weights' initialisation (which Llama's ``_init_weights``
    does not know), and the experts implementation choice (transformers looks for its experts decorator in the
    model class's module; the experts here are DeepSeek-V2's, which have it: grouped_mm / batched_mm / eager)."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekV2Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class DeepseekMoeNativeModel(_MoeParts, LlamaModel):
    """``LlamaModel`` whose feed-forward blocks are ``DeepseekMoeBlock`` in the MoE layers."""

    config_class = DeepseekMoeNativeConfig

    def __init__(self, config: DeepseekMoeNativeConfig) -> None:
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            if config.is_moe_layer(index):
                layer.mlp = DeepseekMoeBlock(config)
        self.post_init()  # initialises the new blocks (the rest already is)


class DeepseekMoeNativeForCausalLM(_MoeParts, HubLayoutMixin, LlamaForCausalLM):
    """DeepSeek-MoE: ``LlamaForCausalLM`` around ``DeepseekMoeNativeModel``."""

    config_class = DeepseekMoeNativeConfig

    def __init__(self, config: DeepseekMoeNativeConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)  # LlamaForCausalLM's own __init__, with the MoE model inside
        self.model = DeepseekMoeNativeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def _mapping() -> list:
    return [WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                            target_patterns="mlp.experts.gate_up_proj",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
            WeightConverter(source_patterns="mlp.experts.*.down_proj.weight", target_patterns="mlp.experts.down_proj",
                            operations=[MergeModulelist(dim=0)])]


# by class name: the mapping must not reach the hub's own classes (model_type "deepseek" too)
register_checkpoint_conversion_mapping(DeepseekMoeNativeForCausalLM.__name__, _mapping(), overwrite=True)

# the hub's linear names are the port's (q/k/v/o_proj, gate/up/down_proj); nothing to translate
HUB_LINEAR_NAMES: dict[str, dict[str, tuple[str, ...]]] = {"deepseek": {}}


def native_config(hub: dict) -> DeepseekMoeNativeConfig:
    moe = {key: hub.get(key, default) for key, default in HUB_DEFAULTS.items()}
    if moe["scoring_func"] != "softmax":
        raise ConfigError(f"DeepSeek-MoE config.json has scoring_func={moe['scoring_func']!r}: the hub code and "
                          "lmtune support only 'softmax'")
    if moe["n_routed_experts"] is not None:
        if not moe["num_experts_per_tok"]:
            raise ConfigError("DeepSeek-MoE config.json sets n_routed_experts but not num_experts_per_tok")
        if int(moe["num_experts_per_tok"]) > int(moe["n_routed_experts"]):
            raise ConfigError(f"DeepSeek-MoE config.json: num_experts_per_tok={moe['num_experts_per_tok']} exceeds "
                              f"n_routed_experts={moe['n_routed_experts']}")
    if int(moe["moe_layer_freq"]) < 1:
        raise ConfigError(f"DeepSeek-MoE config.json: moe_layer_freq must be >= 1, got {moe['moe_layer_freq']}")
    moe["aux_loss_alpha"] = float(moe["aux_loss_alpha"] or 0.0)
    moe["n_shared_experts"] = moe["n_shared_experts"] or None
    defaults = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, **hub}
    kwargs = llama_kwargs(defaults, "DeepSeek-MoE", attention_bias=bool(hub.get("attention_bias", False)),
                          attention_dropout=float(hub.get("attention_dropout", 0.0) or 0.0), mlp_bias=False)
    return DeepseekMoeNativeConfig(**kwargs, **moe)


def model_class(hub: dict) -> type:
    return DeepseekMoeNativeForCausalLM


def load_tokenizer(path: Any, hub: dict, **kwargs: Any) -> Any:
    """DeepSeek's byte-level BPE tokenizer from its ``tokenizer.json``, with the BOS the original adds.

    The hub repositories name ``LlamaTokenizerFast``, which (on transformers 4) rewrites the ``tokenizer.json``
    post-processor from ``add_bos_token`` / ``add_eos_token`` (true / false, as their tokenizer_config.json says);
    transformers 5's ``LlamaTokenizer`` would rebuild the pre-tokenizer and decoder as SentencePiece's, which
    DeepSeek's is not, so lmtune uses the tokenizers backend with the file's own pipeline and the same flags."""
    from lmtune.model.ports import llama_rule_tokenizer

    return llama_rule_tokenizer(path, **kwargs)
