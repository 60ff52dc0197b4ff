"""Shared fixtures: tiny local models and data files, all offline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# hub code a test runs on purpose (trust_remote_code) is cached here, never in the user's HF cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="lmtune-test-modules-"))
# processed-dataset and tiny-model caches of this test session, never the user's
os.environ.setdefault("LMTUNE_CACHE", tempfile.mkdtemp(prefix="lmtune-test-cache-"))

REPO = Path(__file__).resolve().parents[1]

OASST1_ROWS = [
    "### Human: What is the capital of France?### Assistant: The capital of France is Paris.",
    "### Human: Say hello.### Assistant: Hello!### Human: Again, louder.### Assistant: HELLO!",
    "### Human: Name a color.### Assistant: Blue.### Human: Another one?",
    "### Human: Count to three.### Assistant: One, two, three.",
    "### Human: What is two plus two?### Assistant: Two plus two is four.",
    "### Human: Spell cat backwards.### Assistant: tac",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with a BPE tokenizer (ChatML specials, no BOS), saved like a hub model."""
    from lmtune.tools.tiny_model import make_tiny_llama

    texts = OASST1_ROWS + [json.dumps(r) for r in alpaca_rows()]
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), texts, vocab_size=512))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def alpaca_rows() -> list[dict]:
    return [
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say nothing.", "input": "", "output": "<nooutput>"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
        {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
        {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    ]


def wait_for_logged_iterations(work: Path, proc, count: int, limit: float = 900) -> None:
    """Until the run of ``proc`` in ``work`` has logged ``count`` iterations (AssertionError if it ends first)."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(work.glob("*/scalars.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= count:
            return
        time.sleep(0.01)
    stderr = proc.stderr.read()[-3000:] if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"the run did not reach iteration {count} (exit code {proc.poll()}) {stderr}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def oasst1_dir(tmp_path) -> str:
    """A local dataset dir holding oasst1-guanaco-format jsonl, as load_dataset(path=dir) reads it."""
    rows = [{"text": t} for t in OASST1_ROWS] * 4
    write_jsonl(tmp_path / "oasst1" / "train.jsonl", rows)
    return str(tmp_path / "oasst1")


@pytest.fixture
def alpaca_file(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows() * 3))


@pytest.fixture(autouse=True)
def _no_curves_png(request, monkeypatch):
    """Training runs inside tests skip drawing curves.png (about a second each with matplotlib);
    tests/test_visualization.py checks the drawing itself."""
    if request.module.__name__.endswith("test_visualization"):
        return
    from lmtune.engine.hooks.logger import LoggerHook

    monkeypatch.setattr(LoggerHook, "_plot", lambda self, runner: None)
