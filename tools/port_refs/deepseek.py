"""Fixtures of DeepSeek-MoE (v1, ``model_type: deepseek``), from a GitHub copy of its hub modeling code.

The hub repositories (deepseek-ai/deepseek-moe-16b-base / -chat) are not reachable from here and no PyPI wheel
ships their ``modeling_deepseek.py`` (XTuner 0.2.0 has DeepSeek-V2's only). The reference is a copy of the hub
file kept in a public GitHub repository:

- ``ywhijn/moe-project-7101`` at commit ``ca08f90083b4fba0db9d84b11c7f7aac1347be6d``, file
  ``modeling_deepseek.py`` (sha256 ``694650d3aed78dff55a99556214291fee8ba8a2d6be7cb5e327af7b752a7447b``):
  deepseek-moe-16b's ``modeling_deepseek.py`` (``DeepseekForCausalLM``, ``MoEGate``, ``AddAuxiliaryLoss``,
  ``DeepseekMoE``, eager/sdpa/flash Llama attention) with router-logit recording added (``MoEGate.router_logits``,
  ``DeepseekMoE.router_logits``, ``DeepseekModel.all_router_logits``, ``reset_logits``): tuples of logits kept for
  inspection, nothing that changes what is computed. Checked against an independent copy,
  ``zhexiangzhang/ServerlessMOE`` at ``6e1b013e5b4d8c6750d8351cdf0b43bfad9b6255`` (which adds CUDA timing
  instead): apart from those two sets of additions the two files are line for line the same.

``_code_dir`` puts it in ``benchmarks/.port_refs_cache/deepseek-moe/`` (ignored by git; nothing of it is
committed), from a local clone of that repository (``DEEPSEEK_MOE_REF_REPO``, default: the mirror a port session
fetched, ``/work/.mirror/ywhijn+moe-project-7101/repo``) with ``git show <commit>:modeling_deepseek.py``, and
checks its sha256. To make it elsewhere:

    git clone https://github.com/ywhijn/moe-project-7101 /tmp/ds && DEEPSEEK_MOE_REF_REPO=/tmp/ds \\
        benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports \\
        --only deepseek_moe deepseek_moe_norm_tokaux

Shims: the hub file imports ``is_torch_greater_or_equal_than_1_13`` from ``transformers.pytorch_utils``, which
transformers 4.48 no longer has; ``_build`` sets it (True) before the Auto classes load the file. Neither copy
has the hub's ``configuration_deepseek.py``; the cache gets a stand-in ``DeepseekConfig`` (written here, below)
that stores every key of the published config.json with the hub file's defaults. It only
holds attributes; the fixtures' config.json set every key the modeling code reads.

The hub code adds its load-balancing loss to the gradients only (``AddAuxiliaryLoss``: the loss value is the plain
cross-entropy), in train mode. The fixtures' ``aux_loss_alpha`` is 0.1, not the released 0.001, so that the
recorded gradients differ from the cross-entropy's alone by far more than the tests' tolerance.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / ".port_refs_cache" / "deepseek-moe"
REPO = "ywhijn/moe-project-7101"
COMMIT = "ca08f90083b4fba0db9d84b11c7f7aac1347be6d"
SHA256 = "694650d3aed78dff55a99556214291fee8ba8a2d6be7cb5e327af7b752a7447b"
DEFAULT_CLONE = "/work/.mirror/ywhijn+moe-project-7101/repo"

STAND_IN_CONFIG = '''"""Stand-in for deepseek-moe's configuration_deepseek.py (lmtune's tools/port_refs/deepseek.py).

Attributes only, with the hub file's defaults."""
from transformers.configuration_utils import PretrainedConfig


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
                 num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None,
                 n_routed_experts=None, num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
                 norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
                 max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 pad_token_id=None, bos_token_id=100000, eos_token_id=100001, pretraining_tp=1,
                 tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
                 attention_dropout=0.0, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''


def _code_dir() -> Path:
    """The cache dir holding the reference ``modeling_deepseek.py`` and the stand-in configuration."""
    modeling = CACHE / "modeling_deepseek.py"
    if not modeling.is_file():
        clone = os.environ.get("DEEPSEEK_MOE_REF_REPO", DEFAULT_CLONE)
        if not Path(clone).exists():
            raise SystemExit(f"no clone of github.com/{REPO} at {clone}: clone it and set DEEPSEEK_MOE_REF_REPO")
        text = subprocess.run(["git", "-C", clone, "show", f"{COMMIT}:modeling_deepseek.py"], check=True,
                              capture_output=True).stdout
        CACHE.mkdir(parents=True, exist_ok=True)
        modeling.write_bytes(text)
    digest = hashlib.sha256(modeling.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{modeling}: sha256 {digest}, expected {SHA256} ({REPO}@{COMMIT})")
    (CACHE / "configuration_deepseek.py").write_text(STAND_IN_CONFIG)
    return CACHE


def _build(hub_dir: Path):
    """The reference model of a hub dir: the Auto classes with trust_remote_code, as any hub repository, after
    giving transformers 4.48 back a flag the hub file imports (``is_torch_greater_or_equal_than_1_13``, gone
    from ``transformers.pytorch_utils`` by then; true for any torch it runs on)."""
    import torch
    import transformers.pytorch_utils as pytorch_utils
    from transformers import AutoConfig, AutoModelForCausalLM

    pytorch_utils.is_torch_greater_or_equal_than_1_13 = True
    config = AutoConfig.from_pretrained(str(hub_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
    assert type(model.model.layers[1 if config.first_k_dense_replace else 0].mlp).__name__ == "DeepseekMoE"
    return model


_MAP = {"AutoConfig": "configuration_deepseek.DeepseekConfig", "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}
_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
_TINY = dict(architectures=["DeepseekForCausalLM"], auto_map=_MAP, model_type="deepseek", vocab_size=512,
             hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=64,
             initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1,
             eos_token_id=2, pretraining_tp=1, tie_word_embeddings=False, rope_theta=10000, rope_scaling=None,
             attention_bias=False, attention_dropout=0.0, scoring_func="softmax", torch_dtype="float32")

SPECS = {
    # as deepseek-moe-16b: a dense first layer (first_k_dense_replace=1), then MoE with shared experts, top-k
    # weights not renormalised, the per-sequence balance loss
    "deepseek_moe": {
        "code": _code_dir, "files": _FILES, "build": _build,
        "hub": {**_TINY, "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
                "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "aux_loss_alpha": 0.1,
                "seq_aux": True},
        "grads": ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                  "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight",
                  "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                  "model.layers.0.self_attn.q_proj.weight", "model.layers.1.post_attention_layernorm.weight",
                  "model.embed_tokens.weight", "lm_head.weight"),
        "lora_target": "o_proj"},
    # MoE in every other layer from the first (moe_layer_freq=2: layers 0 and 2), no shared experts, renormalised
    # top-k weights, the token-level balance loss, biased attention
    "deepseek_moe_norm_tokaux": {
        "code": _code_dir, "files": _FILES, "build": _build,
        "hub": {**_TINY, "num_hidden_layers": 3, "attention_bias": True, "n_routed_experts": 6,
                "n_shared_experts": None, "num_experts_per_tok": 2, "first_k_dense_replace": 0, "moe_layer_freq": 2,
                "norm_topk_prob": True, "aux_loss_alpha": 0.1, "seq_aux": False},
        "grads": ("model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight",
                  "model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.2.mlp.experts.4.down_proj.weight",
                  "model.layers.1.mlp.down_proj.weight",
                  "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.o_proj.weight",
                  "model.embed_tokens.weight"),
        "lora_target": "o_proj"},
}
