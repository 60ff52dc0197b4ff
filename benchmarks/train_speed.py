"""Training throughput, side by side: lmtune and TRL's SFTTrainer on the same model, data and settings.

    python benchmarks/train_speed.py OUT_DIR [--device cpu|cuda] [--steps N] [--dtype bf16|fp32]
        [--trl-python PYTHON]       # the interpreter that has trl (its own venv on the CPU machine)

Both sides train a locally created Llama (hidden 512, 8 layers, vocab 32k: ~60M parameters) with LoRA
r=64 on every linear layer, max_length 1024, 16 sequences per optimizer step (batch 16 x 1 on a GPU,
batch 1 x 16 accumulation on the CPU), activation checkpointing on, on 2000 alpaca-style rows with a
realistic length spread, loss on the answers only. Measured: non-pad input tokens per second over the
timed steps (after 2 warm-up steps), peak memory, and time to the first step. Runs:

- lmtune (packed rows, chunked loss), in this interpreter;
- TRL default (padding), and TRL ``packing=True`` (best-fit decreasing, padding-free).

Writes OUT_DIR/train_speed.json and prints a Markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRL_SIDE = r'''
import json, sys, time, resource
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data, out, device, dtype, steps, packing = sys.argv[1:8]
steps = int(steps); packing = packing == "1"; cuda = device == "cuda"
tok = AutoTokenizer.from_pretrained(model_dir)
rows = load_dataset("json", data_files=data, split="train")
rows = rows.map(lambda r: {"prompt": r["instruction"], "completion": r["output"]},
                remove_columns=rows.column_names)
torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
batch, accum = (16, 1) if cuda else (1, 16)
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accum, learning_rate=2e-4, logging_steps=1, report_to=[],
                 save_strategy="no", max_length=1024, packing=packing, gradient_checkpointing=True,
                 bf16=(dtype == "bf16" and cuda), use_cpu=not cuda, dataloader_num_workers=0, seed=0)
stats = {"tokens": [], "times": []}


class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k):
        if cuda: torch.cuda.synchronize()
        stats["t0"] = time.perf_counter()

    def on_step_end(self, *a, **k):
        if cuda: torch.cuda.synchronize()
        stats["times"].append(time.perf_counter() - stats["t0"])


class Counting(SFTTrainer):
    def training_step(self, model, inputs, *rest, **kw):
        if "attention_mask" in inputs and not packing:
            n = int(inputs["attention_mask"].sum())
        else:
            n = int(inputs["input_ids"].numel())
        stats.setdefault("pending", 0)
        stats["pending"] += n
        return super().training_step(model, inputs, *rest, **kw)


lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
start = time.perf_counter()
trainer = Counting(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora,
                   callbacks=[Timer()])


class Flush(TrainerCallback):
    def on_step_end(self, *a, **k):
        stats["tokens"].append(stats.pop("pending", 0))


trainer.add_callback(Flush())
if cuda: torch.cuda.reset_peak_memory_stats()
trainer.train()
peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
json.dump({"tokens": stats["tokens"], "times": stats["times"], "peak_mib": peak,
           "setup_s": time.perf_counter() - start - sum(stats["times"])}, open(out + "/stats.json", "w"))
'''


def make_inputs(tmp: Path) -> tuple[str, Path]:
    sys.path.insert(0, str(ROOT))
    from lmtune.tools.tiny_model import make_tiny_llama

    model_dir = tmp / "llama60m"
    rng = random.Random(0)
    words = ("the of and to in is that for it as with was on be by this are or from at which an model data "
             "train answer question city river country large small first last number people water").split()
    rows = []
    for _ in range(2000):  # answers from a few words to ~700: a realistic long-tailed spread
        n_in = rng.randint(4, 60)
        n_out = min(int(rng.lognormvariate(4.6, 0.8)), 700)
        rows.append({"instruction": " ".join(rng.choices(words, k=n_in)), "input": "",
                     "output": " ".join(rng.choices(words, k=max(n_out, 3)))})
    data = tmp / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (model_dir / "config.json").is_file():
        make_tiny_llama(model_dir, [" ".join(words)] * 4, vocab_size=32000, hidden_size=512, num_layers=8,
                        num_heads=8, num_kv_heads=8, intermediate_size=1536, max_position_embeddings=2048)
    return str(model_dir), data


def summarize(tokens: list[int], times: list[float], warmup: int = 2) -> dict:
    t, n = times[warmup:], tokens[warmup:]
    return {"tokens_per_s": sum(n) / sum(t), "sec_per_step": sum(t) / len(t), "steps_timed": len(t)}


def run_lmtune(model_dir: str, data: Path, tmp: Path, device: str, dtype: str, steps: int) -> dict:
    work = tmp / "lmtune"
    cuda = device == "cuda"
    batch, accum = (16, 1) if cuda else (1, 16)
    opts = [f"pretrained_model_name_or_path={model_dir}", f"data_path={data}", "max_length=1024",
            f"batch_size={batch}", f"accumulative_counts={accum}", "train_cfg.max_epochs=None",
            f"train_cfg.max_iters={steps * accum}", "save_steps=1000000", "lr=2e-4",
            "custom_hooks=[{'type': 'lmtune.engine.hooks.ThroughputHook'}]", "default_hooks.logger.interval=1",
            "model.use_activation_checkpointing=True",
            "model.lora={'type': 'peft.LoraConfig', 'r': 64, 'lora_alpha': 16, 'lora_dropout': 0.0}",
            "optim_wrapper.dtype=" + ("'bfloat16'" if dtype == "bf16" else "'float32'"),
            "default_hooks.logger.plot_curves=False"]
    if dtype == "fp32":
        opts.append("optim_wrapper.type='lmtune.engine.optim.OptimWrapper'")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", "demo", "--work-dir", str(work),
                           "--cfg-options", *opts], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rows = [json.loads(line) for log in work.glob("*/scalars.jsonl") for line in log.read_text().splitlines()]
    per_step: list[tuple[int, float]] = []
    for k in range(0, len(rows) - accum + 1, accum):  # one optimizer step = `accum` iterations
        group = rows[k:k + accum]
        per_step.append((sum(int(r.get("tokens_per_sec", 0) * r["time"]) for r in group),
                         sum(r["time"] for r in group)))
    result = summarize([n for n, _ in per_step], [t for _, t in per_step])
    result["peak_mib"] = max(r.get("memory", 0) for r in rows)
    result["wall_s"] = time.monotonic() - start
    result["mfu"] = rows[-1].get("mfu")
    return result


def run_trl(python: str, model_dir: str, data: Path, tmp: Path, device: str, dtype: str, steps: int,
            packing: bool) -> dict:
    out = tmp / ("trl_packing" if packing else "trl_default")
    out.mkdir(parents=True, exist_ok=True)
    script = tmp / "trl_side.py"
    script.write_text(TRL_SIDE)
    done = subprocess.run([python, str(script), model_dir, str(data), str(out), device, dtype, str(steps),
                           "1" if packing else "0"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    stats = json.loads((out / "stats.json").read_text())
    result = summarize(stats["tokens"], stats["times"])
    result["peak_mib"] = stats["peak_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--trl-python", default=sys.executable)
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path("/tmp/lmtune_train_speed")
    tmp.mkdir(exist_ok=True)
    model_dir, data = make_inputs(tmp)
    results: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "dtype": args.dtype, "steps": args.steps}
    for name, fn in (("lmtune", lambda: run_lmtune(model_dir, data, tmp, args.device, args.dtype, args.steps)),
                     ("trl_packing", lambda: run_trl(args.trl_python, model_dir, data, tmp, args.device, args.dtype,
                                                     args.steps, True)),
                     ("trl_default", lambda: run_trl(args.trl_python, model_dir, data, tmp, args.device, args.dtype,
                                                     args.steps, False))):
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - keep the other sides' figures
            results[name] = {"error": str(exc)[-2000:]}
        print(name, json.dumps(results[name])[:1500], flush=True)
        (out / "train_speed.json").write_text(json.dumps(results, indent=2))
    base = results.get("lmtune", {}).get("tokens_per_s")
    print("\n| run | tokens/s | ratio lmtune/run | peak MiB |\n|---|---|---|---|")
    for name in ("lmtune", "trl_packing", "trl_default"):
        r = results.get(name, {})
        if "tokens_per_s" in r:
            ratio = base / r["tokens_per_s"] if base else float("nan")
            print(f"| {name} | {r['tokens_per_s']:.0f} | {ratio:.2f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
