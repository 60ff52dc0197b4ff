"""Fixtures of the Baichuan family, from hub-derived copies of its modeling code on PyPI.

The Baichuan repositories' own files are not on PyPI; two packages there ship copies of them, which
``_cache.package_dir`` downloads (``pip download --no-deps``) into ``benchmarks/.port_refs_cache`` (ignored
by git; nothing of theirs is committed) and unpacks:

- ipex-llm 2.2.0, ``ipex_llm/transformers/gguf/models/model_implement/baichuan``: Baichuan-7B's
  ``configuration_baichuan.py`` / ``modeling_baichuan.py`` (``BaiChuanForCausalLM``: W_pack, RoPE,
  a plain head), which run on transformers 4.48 as they are;
- optimum-habana 1.21.2, ``optimum/habana/transformers/models/baichuan``: Baichuan2-7B/13B-Chat's
  files adapted for Gaudi (``BaichuanForCausalLM``: W_pack, RoPE if config.json has
  ``max_position_embeddings`` else ALiBi, ``NormHead``, the z-loss).

Which copy makes which fixture, and the shims (none changes the math):

- ``baichuan_7b`` (Baichuan-7B): ipex-llm's files, loaded by the Auto classes as any hub repository.
- ``baichuan2_13b`` (Baichuan2-13B: ALiBi, normalised head): optimum-habana's modeling, imported as
  a package with stand-ins for the two Gaudi-only modules it imports (``habana_frameworks.torch.core``,
  whose ``mark_step`` becomes a no-op, and optimum-habana's ``GaudiGenerationMixin``, generation only);
  its ``modeling_attn_mask_utils`` is optimum-habana's own file. Its RMSNorm weights are created
  with ``torch.empty`` (a checkpoint fills them); the reference sets them to one before the random
  perturbation every fixture gets. Its configuration stores
  ``gradient_checkpointing`` as a one-element tuple, true whatever the value, which turns activation
  checkpointing on in training (re-entrant: it would drop the LoRA gradients); the reference switches
  it off.
- ``baichuan2_7b`` (Baichuan2-7B: RoPE, normalised head): optimum-habana's RoPE path applies the
  rotation correctly only on Gaudi (off it, the position ids are not used), so this fixture is
  Baichuan-7B's modeling from ipex-llm with optimum-habana's ``NormHead`` as its head: Baichuan2-7B's
  code is Baichuan-7B's plus that head and the z-loss (0 here); in fp32 it computes the same.

The tiny vocabularies are not Baichuan2's 125,696, by which a real config.json tells Baichuan2 (the
Baichuan2 code normalises its head whatever the vocabulary), so the Baichuan2 fixtures say
``"norm_head": true`` (lmtune's key, which the hub code ignores), as lmtune's export does whenever
the vocabulary no longer tells.

    benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports \\
        --only baichuan_7b baichuan2_7b baichuan2_13b
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from _cache import package_dir  # tools/port_refs is on sys.path (tools/port_fixtures.py)

IPEX_LLM = ("ipex-llm", "2.2.0", "ipex_llm/transformers/gguf/models/model_implement/baichuan")
OPTIMUM_HABANA = ("optimum-habana", "1.21.2", "optimum/habana/transformers")
HABANA_BAICHUAN = "models/baichuan"




def _ipex_baichuan() -> Path:
    return package_dir(*IPEX_LLM)


def _habana_baichuan() -> Path:
    return package_dir(*OPTIMUM_HABANA) / HABANA_BAICHUAN


def _import_as_package(package: str, code_dir: Path, module: str):
    """``code_dir/module.py`` imported as ``package.module`` (so that its relative imports of the files beside
    it work), once."""
    name = f"{package}.{module}"
    if name not in sys.modules:
        holder = types.ModuleType(package)
        holder.__path__ = [str(code_dir)]
        sys.modules[package] = holder
        importlib.import_module(name)
    return sys.modules[name]


def _habana_modeling():
    """optimum-habana's Baichuan2 ``modeling_baichuan``, with stand-ins for what needs Gaudi."""
    root = "_lmtune_ref_optimum_habana"  # stands for optimum.habana.transformers
    for module in ("habana_frameworks", "habana_frameworks.torch", "habana_frameworks.torch.core"):
        sys.modules.setdefault(module, types.ModuleType(module))
    sys.modules["habana_frameworks.torch.core"].mark_step = lambda *args, **kwargs: None  # a lazy-mode graph cut
    for package, path in ((root, package_dir(*OPTIMUM_HABANA)), (f"{root}.generation", None),
                          (f"{root}.models", None)):
        if package not in sys.modules:
            holder = types.ModuleType(package)
            holder.__path__ = [str(path)] if path else []
            sys.modules[package] = holder
    generation = types.ModuleType(f"{root}.generation.utils")

    class GaudiGenerationMixin:  # optimum-habana's generation loop; nothing here generates
        pass

    generation.GaudiGenerationMixin = GaudiGenerationMixin
    sys.modules.setdefault(generation.__name__, generation)
    return _import_as_package(f"{root}.models.baichuan", _habana_baichuan(), "modeling_baichuan")


def _config_kwargs(hub_dir: Path) -> dict:
    import json

    hub = json.loads((hub_dir / "config.json").read_text())
    return {k: v for k, v in hub.items() if k not in ("auto_map", "architectures", "model_type")}


def _build_baichuan2_13b(hub_dir: Path):
    import torch

    modeling = _habana_modeling()
    config = modeling.BaichuanConfig(**_config_kwargs(hub_dir))
    assert not hasattr(config, "max_position_embeddings")  # the hub code's ALiBi path
    model = modeling.BaichuanForCausalLM(config).to(torch.float32)
    model.model.gradient_checkpointing = False  # the configuration's (False,) tuple would switch it on
    assert type(model.lm_head).__name__ == "NormHead"
    with torch.no_grad():  # its RMSNorm weights start as torch.empty (a checkpoint fills them): ones, as Llama's
        for module in model.modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)
    return model


def _build_baichuan2_7b(hub_dir: Path):
    import torch

    modeling = _import_as_package("_lmtune_ref_ipex_llm_baichuan", _ipex_baichuan(), "modeling_baichuan")
    config = modeling.BaiChuanConfig(**_config_kwargs(hub_dir))
    model = modeling.BaiChuanForCausalLM(config).to(torch.float32)
    model.lm_head = _habana_modeling().NormHead(config.hidden_size, config.vocab_size, bias=False)  # Baichuan2's
    return model


_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
             rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02, use_cache=True, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")

_V1_MAP = {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
           "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"}
_V2_MAP = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
           "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
_GRADS = ("model.layers.0.self_attn.W_pack.weight", "model.layers.1.mlp.gate_proj.weight", "lm_head.weight",
          "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight")
_V1_FILES = ("configuration_baichuan.py", "modeling_baichuan.py")
_V2_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "generation_utils.py")

SPECS = {
    # Baichuan-7B: RoPE, a plain head, vocabulary not Baichuan2's
    "baichuan_7b": {
        "code": _ipex_baichuan, "files": _V1_FILES,
        "hub": {"architectures": ["BaiChuanForCausalLM"], "auto_map": _V1_MAP, "model_type": "baichuan",
                **_TINY, "max_position_embeddings": 64},
        "grads": _GRADS, "lora_target": "o_proj"},
    # Baichuan2-7B: RoPE and the normalised head
    "baichuan2_7b": {
        "code": _ipex_baichuan, "files": _V1_FILES, "build": _build_baichuan2_7b,
        "hub": {"architectures": ["BaichuanForCausalLM"], "auto_map": _V2_MAP, "model_type": "baichuan",
                **_TINY, "max_position_embeddings": 64, "model_max_length": 64, "z_loss_weight": 0,
                "norm_head": True},
        "grads": _GRADS, "lora_target": "o_proj"},
    # Baichuan2-13B: ALiBi (no max_position_embeddings), the normalised head; 6 heads, not a power of two
    # (Baichuan2-13B has 40), for the interleaved slopes
    "baichuan2_13b": {
        "code": _habana_baichuan, "files": _V2_FILES, "build": _build_baichuan2_13b,
        "hub": {"architectures": ["BaichuanForCausalLM"], "auto_map": _V2_MAP, "model_type": "baichuan",
                **{**_TINY, "hidden_size": 96, "num_attention_heads": 6}, "model_max_length": 64,
                "gradient_checkpointing": False, "z_loss_weight": 0, "norm_head": True},
        "grads": _GRADS, "lora_target": "o_proj"},
}
