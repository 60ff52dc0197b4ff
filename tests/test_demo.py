"""The README's first command: the built-in demo trains a tiny model that visibly learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_learns_and_checkpoints(tmp_path):
    env = dict(os.environ, LMTUNE_CACHE=str(tmp_path / "cache"))
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", "demo", "--work-dir", str(work)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Iter(train)" in proc.stdout and "Evaluate chat (after training)" in proc.stdout

    (log_dir,) = [p for p in work.iterdir() if p.is_dir() and not p.name.startswith("iter_")]
    losses = [json.loads(line)["loss"] for line in (log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 3, losses

    answers = [json.loads(line) for line in (log_dir / "eval_chat.jsonl").read_text().splitlines()]
    before = [a["output"] for a in answers if a["when"] == "before training"]
    after = [a["output"] for a in answers if a["when"] == "after training"]
    assert after == ["Paris.", "Peru."], after
    assert before != after

    assert (work / "last_checkpoint").read_text().strip() == "iter_680"
    assert (work / "iter_680" / "model.safetensors").is_file()
