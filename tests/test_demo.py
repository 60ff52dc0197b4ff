"""The README's first command: the built-in demo trains a tiny model that visibly learns, and says only
what a user needs to read."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_learns_and_checkpoints(tmp_path):
    env = dict(os.environ, LMTUNE_CACHE=str(tmp_path / "cache"))  # a fresh cache: the model is made here too
    env.pop("DS_ACCELERATOR", None)
    work = tmp_path / "work"
    # about a minute on an idle 2-core machine: the limit only catches a hang
    proc = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", "demo", "--work-dir", str(work)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Iter(train) [ 10/680]" in out and "eta: " in out and "Evaluate chat (after training)" in out

    # nothing but lmtune's lines: no progress bars in a log, no library warnings a user cannot act on
    assert "\r" not in out, [line for line in out.splitlines() if "\r" in line][:3]
    assert "Setting accelerator" not in out
    assert "deprecated" not in out.lower() and "Warning" not in out
    # the first row is shown by its first sample; the whole row is in the log dir
    before = out.split("Evaluate chat (before training)")[0]
    assert before.count("<|im_start|>system") == 1
    (log_dir,) = [p for p in work.iterdir() if p.is_dir() and not p.name.startswith("iter_")]
    assert str(log_dir / "first_row.txt") in before
    assert (log_dir / "first_row.txt").read_text().count("<|im_start|>system") > 1

    losses = [json.loads(line)["loss"] for line in (log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 3, losses

    answers = [json.loads(line) for line in (log_dir / "eval_chat.jsonl").read_text().splitlines()]
    before = [a["output"] for a in answers if a["when"] == "before training"]
    after = [a["output"] for a in answers if a["when"] == "after training"]
    assert after == ["Paris.", "Peru."], after
    assert before != after

    assert (work / "last_checkpoint").read_text().splitlines()[0] == "iter_680"
    assert (work / "iter_680" / "model.safetensors").is_file()


def test_a_lora_run_with_activation_checkpointing_prints_no_library_warnings(tmp_path):
    env = dict(os.environ, LMTUNE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "lmtune.cli", "train", "demo", "--work-dir", str(tmp_path / "work"),
           "--cfg-options", "max_epochs=1", "evaluation_freq=1000", "model.use_activation_checkpointing=True",
           'model.lora={"type": "peft.LoraConfig", "r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "trainable of" in out and "Iter(train)" in out
    assert "deprecated" not in out.lower() and "Warning" not in out and "\r" not in out, out[-3000:]
