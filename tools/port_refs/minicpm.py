"""Fixtures of the MiniCPM (model_type "minicpm") and MiniCPM3 ("minicpm3") families, from copies of their hub code.

Neither family's hub files are on PyPI as they are; the references come from these copies, kept in
``benchmarks/.port_refs_cache`` (ignored by git; nothing of theirs is committed):

- MiniCPM (openbmb/MiniCPM-2B-sft-bf16 and its siblings): OpenBMB's own GitHub repository
  https://github.com/OpenBMB/MiniCPM, commit 5977a63783814ae3478cbbf53d52071ac2837522 ("Fix: flash_attn and
  cpu inference", 2024-02-03), files ``model/modeling_minicpm.py`` (sha256 22fb3089...) and
  ``model/configuration_minicpm.py`` (sha256 eca7460a...): the repository's copy of the hub's modeling code
  (removed from the repository in September 2024). It knows the ``linear`` and ``dynamic`` RoPE scalings
  (``rope_scaling = {"type", "factor"}``); the later hub revisions' ``longrope`` (MiniCPM-1B / MiniCPM4
  configs) is not in this copy (see below). One shim: the copy imports ``is_torch_greater_or_equal_than_1_13``
  from ``transformers.pytorch_utils``, which transformers 4.48 no longer defines; the reference sets it to
  True, its value on any torch >= 1.13. ``_openbmb_dir`` takes the files from the cache, else from a
  local git mirror of that repository named by ``$MINICPM_GIT_DIR`` (``git clone --bare
  https://github.com/OpenBMB/MiniCPM``); without either it stops and says which two files to download.
- MiniCPM3 (openbmb/MiniCPM3-4B): optimum-habana 1.21.2 (PyPI), ``optimum/habana/transformers/models/minicpm``:
  its docstring says "Copied from https://huggingface.co/openbmb/MiniCPM3-4B/tree/6fcf8b4e629d01a435b96e898899e0b6d9bddb7a",
  adapted for Gaudi (``token_idx`` for static-shape generation, ``htcore.mark_step`` and ``FusedSDPA`` in the sdpa
  path). The reference imports it as a package with stand-ins for what only exists on Gaudi: the modules
  ``habana_frameworks.torch.core`` (``mark_step`` a no-op) and ``habana_frameworks.torch.hpex.kernels``
  (``FusedSDPA``, never called: the reference runs the eager attention), optimum-habana's ``warn0`` (a warning)
  and ``GaudiGenerationMixin`` (generation only). None changes the math: eager attention, no ``token_idx``.
  Its LongRoPE class is the one the later MiniCPM (v1) hub revisions use as well.

Variants (one fixture per change of the math):

The checkpoint of a tied model is written without ``lm_head.weight``, as the hub code's ``save_pretrained``
writes it (``_tied_weights_keys``); a state-dict hook of the reference drops it.

- ``minicpm``: MiniCPM-2B's shape of config (no ``tie_word_embeddings`` key: the hub config class ties the
  head to the embeddings), grouped key/value heads, no RoPE scaling; muP scalings as MiniCPM's
  (``scale_emb`` 12, ``scale_depth`` 1.4, ``dim_model_base`` 16 so that hidden / base = 4);
- ``minicpm_untied_dynamic``: an untied head and ``{"type": "dynamic", "factor": 2.0}`` with
  ``max_position_embeddings`` 8 < the 12-token rows (the NTK base actually changes);
- ``minicpm_longrope``: MiniCPM with ``{"rope_type": "longrope", ...}`` (the later MiniCPM revisions' key), 64 >
  32 positions: the OpenBMB copy with optimum-habana's ``MiniCPMLongRoPE`` as each layer's rotary embedding;
- ``minicpm3``: MiniCPM3-4B's shape (MLA with q/kv low-rank projections, LongRoPE with ``max_position_embeddings``
  = ``original_max_position_embeddings``, as released: the short factors, attention factor 1);
- ``minicpm3_longrope``: LongRoPE with ``max_position_embeddings`` 64 > ``original_max_position_embeddings`` 16:
  the hub code then uses the long factors at every length (its cache is built at ``max_position_embeddings``) and
  scales cos/sin by ``sqrt(1 + log(64/16) / log(16))``.

    benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports \\
        --only minicpm minicpm_untied_dynamic minicpm_longrope minicpm3 minicpm3_longrope
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

from _cache import CACHE, package_dir  # tools/port_refs is on sys.path (tools/port_fixtures.py)

OPENBMB_COMMIT = "5977a63783814ae3478cbbf53d52071ac2837522"
OPENBMB_FILES = ("configuration_minicpm.py", "modeling_minicpm.py")
OPTIMUM_HABANA = ("optimum-habana", "1.21.2", "optimum/habana/transformers/models/minicpm")


def _openbmb_dir() -> Path:
    """OpenBMB/MiniCPM's ``model/`` directory at ``OPENBMB_COMMIT``: from the cache, else from ``$MINICPM_GIT_DIR``."""
    target = CACHE / f"OpenBMB-MiniCPM-{OPENBMB_COMMIT[:7]}" / "model"
    if all((target / f).is_file() for f in OPENBMB_FILES):
        return target
    git_dir = os.environ.get("MINICPM_GIT_DIR")
    if not git_dir:
        sys.exit(f"MiniCPM's reference code is not in {target}: put model/{' and model/'.join(OPENBMB_FILES)} of "
                 f"https://github.com/OpenBMB/MiniCPM at commit {OPENBMB_COMMIT} there, or set MINICPM_GIT_DIR to a "
                 "clone of that repository")
    target.mkdir(parents=True, exist_ok=True)
    for name in OPENBMB_FILES:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{OPENBMB_COMMIT}:model/{name}"],
                              check=True, capture_output=True).stdout
        (target / name).write_bytes(text)
    return target




def _habana_minicpm3() -> Path:
    return package_dir(*OPTIMUM_HABANA)


def _holder(name: str, path: Path | None = None) -> types.ModuleType:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)] if path else []
        sys.modules[name] = module
    return sys.modules[name]


def _openbmb_modeling():
    import transformers.pytorch_utils

    # a flag transformers 4.48 no longer defines (torch >= 1.13 here): its value on this torch
    transformers.pytorch_utils.is_torch_greater_or_equal_than_1_13 = True
    package = "_lmtune_ref_openbmb_minicpm"
    _holder(package, _openbmb_dir())
    return importlib.import_module(f"{package}.modeling_minicpm")


def _habana_modeling():
    """optimum-habana's MiniCPM3 ``modeling_minicpm``, with stand-ins for what needs Gaudi."""
    import warnings

    for name in ("habana_frameworks", "habana_frameworks.torch", "habana_frameworks.torch.core",
                 "habana_frameworks.torch.hpex", "habana_frameworks.torch.hpex.kernels"):
        _holder(name)
    sys.modules["habana_frameworks.torch.core"].mark_step = lambda *args, **kwargs: None  # a lazy-mode graph cut

    class FusedSDPA:  # Gaudi's fused attention kernel: the reference runs the eager attention instead
        @staticmethod
        def apply(*args, **kwargs):
            raise RuntimeError("FusedSDPA is Gaudi-only; the MiniCPM3 reference must run eager attention")

    sys.modules["habana_frameworks.torch.hpex.kernels"].FusedSDPA = FusedSDPA
    root = "_lmtune_ref_optimum_habana"  # stands for optimum.habana
    for name in (root, f"{root}.transformers", f"{root}.transformers.models", f"{root}.transformers.generation"):
        _holder(name)
    _holder(f"{root}.transformers.models.minicpm", _habana_minicpm3())
    utils = _holder(f"{root}.utils")
    utils.warn0 = lambda message, *args, **kwargs: warnings.warn(message, stacklevel=2)
    generation = _holder(f"{root}.transformers.generation.utils")

    class GaudiGenerationMixin:  # optimum-habana's generation loop; nothing here generates
        pass

    generation.GaudiGenerationMixin = GaudiGenerationMixin
    return importlib.import_module(f"{root}.transformers.models.minicpm.modeling_minicpm")


def _config_kwargs(hub_dir: Path) -> dict:
    import json

    hub = json.loads((hub_dir / "config.json").read_text())
    return {k: v for k, v in hub.items() if k not in ("auto_map", "architectures", "model_type")}


def _eager(modeling, config_cls: str, model_cls: str, hub_dir: Path):
    import torch

    config = getattr(modeling, config_cls)(**_config_kwargs(hub_dir))
    config._attn_implementation = "eager"  # (the config classes switch to flash-attention when it is importable)
    model = getattr(modeling, model_cls)._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    assert model.config._attn_implementation == "eager"
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight

        def drop_tied_head(module, state, prefix, local_metadata):  # as save_pretrained writes a tied checkpoint
            state.pop(prefix + "lm_head.weight", None)

        model._register_state_dict_hook(drop_tied_head)
    return model


def _build_minicpm(hub_dir: Path):
    return _eager(_openbmb_modeling(), "MiniCPMConfig", "MiniCPMForCausalLM", hub_dir)


def _build_minicpm_longrope(hub_dir: Path):
    """MiniCPM's code with LongRoPE: the OpenBMB copy predates it, so each layer's rotary embedding is replaced by
    the LongRoPE class of optimum-habana's MiniCPM3 copy (the later MiniCPM hub revisions define the same class and
    build it the same way: ``head_dim``, ``max_position_embeddings``, ``rope_theta`` and the three rope_scaling
    values)."""
    import json

    hub = json.loads((hub_dir / "config.json").read_text())
    scaling = hub["rope_scaling"]
    (hub_dir / "config.json").write_text(json.dumps({**hub, "rope_scaling": None}))  # what the OpenBMB copy accepts
    model = _build_minicpm(hub_dir)
    long_rope = _habana_modeling().MiniCPMLongRoPE
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.rotary_emb = long_rope(
            attention.head_dim, max_position_embeddings=hub["max_position_embeddings"], base=hub["rope_theta"],
            short_factor=scaling["short_factor"], long_factor=scaling["long_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"])
    return model


def _build_minicpm3(hub_dir: Path):
    model = _eager(_habana_modeling(), "MiniCPM3Config", "MiniCPM3ForCausalLM", hub_dir)
    assert type(model.model.layers[0].self_attn).__name__ == "MiniCPMAttention"  # eager, not FusedSDPA
    return model


_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
             rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.1, use_cache=True, bos_token_id=1,
             eos_token_id=2, scale_emb=12, dim_model_base=16, scale_depth=1.4, torch_dtype="float32")

_V1_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMConfig", "AutoModel": "modeling_minicpm.MiniCPMModel",
           "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
           "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
           "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification"}
_V3_MAP = {"AutoConfig": "configuration_minicpm.MiniCPM3Config", "AutoModel": "modeling_minicpm.MiniCPM3Model",
           "AutoModelForCausalLM": "modeling_minicpm.MiniCPM3ForCausalLM",
           "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPM3ForCausalLM",
           "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPM3ForSequenceClassification"}
_V1_GRADS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.1.post_attention_layernorm.weight", "model.norm.weight")
_V3_GRADS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_a_proj.weight",
             "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.q_b_proj.weight",
             "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
             "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.norm.weight")
_MLA = dict(num_key_value_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, q_lora_rank=32, kv_lora_rank=16,
            attention_bias=False)


def _longrope(original: int, short: list[float], long: list[float]) -> dict:
    return {"type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original}


SPECS = {
    # MiniCPM-2B-sft-bf16's kind of config.json: no tie_word_embeddings key (tied), no RoPE scaling
    "minicpm": {
        "code": _openbmb_dir, "files": OPENBMB_FILES, "build": _build_minicpm,
        "hub": {"architectures": ["MiniCPMForCausalLM"], "auto_map": _V1_MAP, "model_type": "minicpm", **_TINY,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_scaling": None},
        "grads": _V1_GRADS, "lora_target": "o_proj"},
    # an untied head; dynamic NTK scaling past max_position_embeddings (8 < the 12-token rows)
    "minicpm_untied_dynamic": {
        "code": _openbmb_dir, "files": OPENBMB_FILES, "build": _build_minicpm,
        "hub": {"architectures": ["MiniCPMForCausalLM"], "auto_map": _V1_MAP, "model_type": "minicpm", **_TINY,
                "num_key_value_heads": 4, "max_position_embeddings": 8, "tie_word_embeddings": False,
                "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "grads": (*_V1_GRADS, "lm_head.weight"), "lora_target": "o_proj"},
    # MiniCPM (the later revisions: MiniCPM-1B, MiniCPM4) with LongRoPE past its original length
    "minicpm_longrope": {
        "code": _openbmb_dir, "files": OPENBMB_FILES, "build": _build_minicpm_longrope,
        "hub": {"architectures": ["MiniCPMForCausalLM"], "auto_map": _V1_MAP, "model_type": "minicpm", **_TINY,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 10000.0,
                "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.1],
                                 "long_factor": [1.0, 1.2, 1.9, 3.1, 4.8, 7.0, 9.6, 12.5],
                                 "original_max_position_embeddings": 32}},
        "grads": _V1_GRADS, "lora_target": "v_proj"},
    # MiniCPM3-4B's kind: MLA, LongRoPE at its original length (short factors, attention factor 1), tied
    "minicpm3": {
        "code": _habana_minicpm3, "files": ("configuration_minicpm.py", "modeling_minicpm.py"),
        "build": _build_minicpm3,
        "hub": {"architectures": ["MiniCPM3ForCausalLM"], "auto_map": _V3_MAP, "model_type": "minicpm3", **_TINY,
                **_MLA, "max_position_embeddings": 64, "rope_theta": 10000.0,
                "rope_scaling": _longrope(64, [1.0, 1.3, 2.1, 3.7], [1.1, 2.5, 5.0, 9.5])},
        "grads": _V3_GRADS, "lora_target": "kv_b_proj"},
    # LongRoPE past its original length: the long factors everywhere, cos/sin scaled; an untied head
    "minicpm3_longrope": {
        "code": _habana_minicpm3, "files": ("configuration_minicpm.py", "modeling_minicpm.py"),
        "build": _build_minicpm3,
        "hub": {"architectures": ["MiniCPM3ForCausalLM"], "auto_map": _V3_MAP, "model_type": "minicpm3", **_TINY,
                **_MLA, "max_position_embeddings": 64, "rope_theta": 1000.0, "tie_word_embeddings": False,
                "rope_scaling": _longrope(16, [1.0, 1.3, 2.1, 3.7], [1.1, 2.5, 5.0, 9.5])},
        "grads": (*_V3_GRADS, "lm_head.weight"), "lora_target": "q_b_proj"},
}
