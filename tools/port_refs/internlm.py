"""Fixtures of the InternLM families: their original code is in XTuner 0.2.0's wheel (``xtuner/_lite/modelings``)."""

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
