"""Fixtures of the InternLM families.

- InternLM2/2.5 and InternLM3: their original code is in XTuner 0.2.0's wheel (``xtuner/_lite/modelings``).
- InternLM (v1): the hub repository ``internlm/internlm-20b`` at revision ``5d2ec53`` (its last revision
  with ``modeling_internlm.py``; the 7B's code is the same class), copied into
  ``benchmarks/.port_refs_cache/internlm-20b-5d2ec53`` (ignored by git). Where that folder is empty, the
  two files are downloaded from the hub at that revision; without hub access, put them there by hand (a
  git mirror of the hub repository has them: ``git show 5d2ec53:modeling_internlm.py``). It runs on
  transformers 4.48 as it is.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _xtuner_modeling(family: str) -> Path:
    spec = importlib.util.find_spec("xtuner")
    if spec is None or spec.origin is None:
        sys.exit("xtuner is not installed here: run this with benchmarks/.venv-xtuner/bin/python "
                 "(bash benchmarks/setup_xtuner_env.sh makes it)")
    return Path(spec.origin).parent / "_lite" / "modelings" / family


INTERNLM_V1 = ("internlm/internlm-20b", "5d2ec53011264932ae335098c0ddf578a504c7a4")
_V1_CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / ".port_refs_cache" / "internlm-20b-5d2ec53"
_V1_FILES = ("configuration_internlm.py", "modeling_internlm.py")


def _internlm_v1_code() -> Path:
    missing = [name for name in _V1_FILES if not (_V1_CACHE / name).is_file()]
    if missing:
        from huggingface_hub import hf_hub_download

        _V1_CACHE.mkdir(parents=True, exist_ok=True)
        for name in missing:
            hf_hub_download(INTERNLM_V1[0], name, revision=INTERNLM_V1[1], local_dir=_V1_CACHE)
    return _V1_CACHE


_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
             tie_word_embeddings=False, torch_dtype="float32")

# name -> (code dir, code files, hub config.json, weights to record gradients of, LoRA target (hub module name))
_TABLE = {
    "internlm2": ("internlm2", ("configuration_internlm2.py", "modeling_internlm2.py"), {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        **_TINY, "num_key_value_heads": 2, "bias": False, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
        "rope_scaling": None, "hidden_act": "silu", "attn_implementation": "eager"},
        ("model.layers.0.attention.wqkv.weight", "model.layers.1.feed_forward.w1.weight", "output.weight",
         "model.tok_embeddings.weight"), "wo"),
    "internlm2_bias_dynamic": ("internlm2", ("configuration_internlm2.py", "modeling_internlm2.py"), {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        **{**_TINY, "max_position_embeddings": 8}, "num_key_value_heads": 4, "bias": True, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu",
        "attn_implementation": "eager"},
        ("model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wqkv.bias",
         "model.layers.0.attention.wo.bias"), "wo"),
    "internlm3": ("internlm3", ("configuration_internlm3.py", "modeling_internlm3.py"), {
        "architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3",
        "auto_map": {"AutoConfig": "configuration_internlm3.InternLM3Config",
                     "AutoModel": "modeling_internlm3.InternLM3Model",
                     "AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"},
        **_TINY, "num_key_value_heads": 2, "head_dim": 16, "qkv_bias": False, "bias": False, "rms_norm_eps": 1e-5,
        "rope_theta": 50000000, "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"}, "hidden_act": "silu"},
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"), "o_proj"),
}




def _spec(code_dir: str, files: tuple, hub: dict, grads: tuple, lora_target: str) -> dict:
    return {"code": lambda: _xtuner_modeling(code_dir), "files": files, "hub": hub, "grads": grads,
            "lora_target": lora_target}


SPECS = {name: _spec(*row) for name, row in _TABLE.items()}
# InternLM (v1): Llama's names, biased q/k/v/o (its config's ``bias``, true by default)
SPECS["internlm"] = {
    "code": _internlm_v1_code, "files": _V1_FILES,
    "hub": {"architectures": ["InternLMForCausalLM"], "model_type": "internlm",
            "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                         "AutoModel": "modeling_internlm.InternLMForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
            **_TINY, "bias": True, "rms_norm_eps": 1e-6, "hidden_act": "silu", "pad_token_id": 0},
    "grads": ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.bias",
              "model.layers.1.mlp.up_proj.weight", "lm_head.weight"),
    "lora_target": "o_proj"}
