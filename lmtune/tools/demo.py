"""The built-in demo's model and data: a tiny Llama created locally, sample rows shipped in the package."""

from __future__ import annotations

import json
from pathlib import Path

from lmtune.tools.tiny_model import cached_tiny_llama

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEMO_DATA = DATA_DIR / "demo_alpaca.jsonl"

DEMO_MODEL = dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                  intermediate_size=512, max_position_embeddings=1024)


def demo_data_path() -> str:
    return str(DEMO_DATA)


def demo_model_dir() -> str:
    """A randomly initialised tiny Llama whose tokenizer was trained on the demo data (cached)."""
    texts = []
    for line in DEMO_DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        # each field on its own, as the encoder tokenizes them: answers start without a space
        texts += [row["instruction"], row["input"], row["output"]]
    return cached_tiny_llama("demo-llama", texts, **DEMO_MODEL)
