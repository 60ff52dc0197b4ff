"""What validation costs: the demo's wall time with a 1% split validated every ``save_steps`` against without,
and the peak memory of one validation pass against one training step, in one run.

Wall time: ``lmtune train demo`` in a subprocess, plain and with ``--cfg-options val_split=0.01`` (validated
every 300 iterations, the demo's ``save_steps``, and at the end), alternating, ``--repeats`` times each; the
median of each and their ratio, and the seconds the validation passes themselves took (from their log lines:
the two runs also differ by the two rows the split takes from training, so their ratio carries that and the
machine's noise). Memory: a subprocess builds the run of a larger tiny model on the demo data packed into rows
of ``--max-length`` tokens and reports the peak resident memory (``ru_maxrss``) above what it held once built,
after one training step or after one validation pass (a 30% split, so that its rows are as full as the training
rows).

    python benchmarks/validation_overhead.py                 # both parts
    python benchmarks/validation_overhead.py --skip-walltime # memory only (seconds)
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VAL_TIME = re.compile(r"Iter\(val\) .* time: ([0-9.]+)s")


def _demo_seconds(work: Path, extra: list[str]) -> tuple[float, float]:
    """The wall time of one demo run, and the seconds its validation passes took (from its log)."""
    cmd = [sys.executable, "-m", "lmtune.cli", "train", "demo", "--work-dir", str(work), "--seed", "0", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    log = "".join(path.read_text() for path in work.glob("*/*.log"))
    return seconds, sum(float(m) for m in VAL_TIME.findall(log))


def walltime(repeats: int) -> dict:
    times: dict[str, list[float]] = {"plain": [], "val_split=0.01": []}
    passes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(repeats):
            order = list(times) if n % 2 == 0 else list(reversed(times))
            for name in order:
                extra = ["--cfg-options", "val_split=0.01"] if name != "plain" else []
                seconds, validating = _demo_seconds(Path(tmp) / f"{name}{n}", extra)
                times[name].append(seconds)
                if extra:
                    passes.append(validating)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"runs": times, "median_s": medians, "ratio": medians["val_split=0.01"] / medians["plain"],
            "validation_passes_s": passes,
            "validation_share_of_run": statistics.median(passes) / medians["val_split=0.01"]}


def _measure(mode: str, model_dir: str, max_length: int, work: str) -> dict:
    """In this process: build the run, then one training step or one validation pass; peak RSS above built."""
    from lmtune.configs import load_config
    from lmtune.engine.runner import Runner

    cfg = load_config("demo", {"pretrained_model_name_or_path": model_dir, "max_length": max_length,
                               "val_split": 0.3, "custom_hooks": [], "default_hooks.checkpoint": None,
                               "train_cfg.max_epochs": None, "train_cfg.max_iters": 1,
                               "model.use_activation_checkpointing": False})
    runner = Runner.from_config(cfg, work_dir=work, seed=0)
    batch = next(iter(runner.val_dataloader))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if mode == "train_step":
        runner.train()
    else:
        runner.val_loop.run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "peak_above_built_mib": (peak - before) / 1024, "seconds": seconds,
            "val_rows": len(runner.val_dataloader.dataset), "row_tokens": int(batch["input_ids"].shape[1])}


def memory(max_length: int) -> dict:
    from lmtune.tools.demo import demo_data_path
    from lmtune.tools.tiny_model import make_tiny_llama

    texts = [line for line in Path(demo_data_path()).read_text(encoding="utf-8").splitlines()]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(Path(tmp) / "model", texts, vocab_size=4096, hidden_size=256, num_layers=4,
                                num_heads=8, num_kv_heads=4, intermediate_size=768,
                                max_position_embeddings=max(2048, max_length))
        for mode in ("train_step", "val_pass"):
            done = subprocess.run([sys.executable, __file__, "--measure", mode, "--model", str(model),
                                   "--max-length", str(max_length), "--work", str(Path(tmp) / mode)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    out["val_over_train_memory"] = out["val_pass"]["peak_above_built_mib"] / out["train_step"]["peak_above_built_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--skip-walltime", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.model, args.max_length, args.work)))
        return
    result = {"memory": memory(args.max_length)}
    if not args.skip_walltime:
        result["walltime"] = walltime(args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
