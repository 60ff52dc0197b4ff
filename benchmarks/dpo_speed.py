"""DPO throughput and memory, side by side: lmtune's DPO against TRL's DPOTrainer (and lmtune's SFT step on
the same tokens, for the memory of the DPO step).

    python benchmarks/dpo_speed.py OUT_DIR [--device cpu|cuda] [--steps N] [--pairs N] [--runs NAME,...]
        [--trl-python PY]

Every side trains the same locally created Llama as benchmarks/train_speed.py (hidden 512, 4 layers, vocab
32k, 46M parameters) with LoRA r=64 on every linear layer of the decoder, activation checkpointing on, AdamW
lr 5e-6, fp32, DPO sigmoid loss with beta 0.1 and the reference model being the base with the adapters
disabled, on the same preference pairs: prompt and chosen answer from benchmarks/data_pipeline.py's
long-tailed alpaca rows, the rejected answer another row's (mean ~520 tokens a pair, a few longer than 2048),
rendered with one ChatML chat template, sequences cut at 1024 tokens. Runs (``--runs``, default all):

- ``lmtune_dpo``: pairs packed into rows of 2048 tokens (each sequence attends only to itself), 1 row x 4
  accumulation a step;
- ``lmtune_sft``: lmtune's SFT on the same sequences (chosen and rejected as samples, packed alike), for the
  memory of a step on the same tokens;
- ``trl_dpo_b8``: TRL's DPOTrainer, 8 pairs a batch (padded to the longest of its 16 sequences), 1 step each;
- ``trl_dpo_b1``: TRL, 1 pair a batch x 8 accumulation (no padding; TRL 1.16's ``padding_free`` is disabled
  and falls back to padding).

Measured per side: non-pad tokens per second over the optimizer steps after the first (every hook and the
data loading included), and peak memory (on a CPU the process's peak RSS, which includes torch's and the
libraries' own ~0.5 GiB; on GPUs the peak allocated memory). Writes OUT_DIR/dpo_speed.json and .md;
docs/benchmarks.md has the results.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data_pipeline import base_env, make_rows, make_tokenizer, write_jsonl  # noqa: E402
from train_speed import make_model  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MAX_LENGTH, PACKED, ACCUM = 1024, 2048, 4

LMTUNE_CONFIG = '''\
# Written by benchmarks/dpo_speed.py.
import torch
from datasets import load_dataset
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.dataset import DefaultSampler, build_preference_dataset, preference_collate_fn, process_hf_dataset
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.map_fns import openai_map_fn, template_map_fn_factory
from lmtune.engine.hooks import CheckpointHook, LoggerHook
from lmtune.engine.optim import OptimWrapper
from lmtune.engine.runner import TrainLoop
from lmtune.model import DPO, SupervisedFinetune

path, pairs, sequences, kind = {model!r}, {pairs!r}, {sequences!r}, {kind!r}
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path)
llm = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path, dtype=torch.float32)
lora = dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
if kind == "dpo":
    model = dict(type=DPO, llm=llm, lora=lora, beta=0.1, loss_type="sigmoid", use_varlen_attn=True)
    dataset = dict(type=build_preference_dataset, dataset=dict(type=load_dataset, path="json", data_files=pairs),
                   tokenizer=tokenizer, max_length={max_length}, use_varlen_attn=True, max_packed_length={packed})
    collate = dict(type=preference_collate_fn, use_varlen_attn=True)
else:
    model = dict(type=SupervisedFinetune, llm=llm, lora=lora)
    dataset = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="json", data_files=sequences),
                   tokenizer=tokenizer, max_length={packed}, dataset_map_fn=openai_map_fn,
                   template_map_fn=dict(type=template_map_fn_factory, template=None), pack_to_max_length=True)
    collate = dict(type=default_collate_fn)
train_dataloader = dict(batch_size=1, num_workers=0, dataset=dataset, sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=collate)
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=5e-6), accumulative_counts={accum})
param_scheduler = []
train_cfg = dict(type=TrainLoop, max_iters={iters})
default_hooks = dict(logger=dict(type=LoggerHook, interval=1, plot_curves=False),
                     checkpoint=dict(type=CheckpointHook, interval=100000, by_epoch=False, save_last=False))
randomness = dict(seed=0)
'''

TRL_SIDE = r'''
import json, os, resource, sys, time
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

model_dir, data, out, device, steps, batch, accum, max_length = sys.argv[1:9]
steps, batch, accum, cuda = int(steps), int(batch), int(accum), device == "cuda"
tok = AutoTokenizer.from_pretrained(model_dir)
rows = load_dataset("json", data_files=data, split="train")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                 learning_rate=5e-6, logging_steps=1, report_to=[], save_strategy="no", max_length=int(max_length),
                 gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, seed=0,
                 beta=0.1, loss_type=["sigmoid"])
stats = {"steps": [], "pending": 0}


def sync():
    if cuda: torch.cuda.synchronize()


class Counting(DPOTrainer):
    def training_step(self, model, inputs, *rest, **kw):
        stats["pending"] += int(inputs["attention_mask"].sum())
        return super().training_step(model, inputs, *rest, **kw)


class Timer(TrainerCallback):
    def on_train_begin(self, *a, **k):
        sync(); stats["last"] = time.perf_counter()

    def on_step_end(self, *a, **k):
        sync(); now = time.perf_counter()
        stats["steps"].append({"seconds": now - stats["last"], "tokens": stats["pending"]})
        stats["last"], stats["pending"] = now, 0


lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = Counting(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora,
                   callbacks=[Timer()])
if cuda: torch.cuda.reset_peak_memory_stats()
trainer.train()
json.dump({"steps": stats["steps"], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None},
          open(os.path.join(out, "probe.json"), "w"))
'''

RUNS = {"lmtune_dpo": ("lmtune", "dpo"), "lmtune_sft": ("lmtune", "sft"), "trl_dpo_b8": ("trl", (8, 1)),
        "trl_dpo_b1": ("trl", (1, 8))}


def make_pairs(n: int, tmp: Path) -> tuple[Path, Path]:
    """Preference pairs (conversations) and the same sequences as SFT conversations."""
    rows = [r for r in make_rows(3 * n, seed=11) if r["output"] != "<nooutput>"]
    rng = random.Random(5)
    pairs, sequences = [], []
    for k in range(n):
        row, other = rows[k], rows[n + k]
        prompt = [{"role": "user", "content": row["instruction"] + ("\n" + row["input"] if row["input"] else "")}]
        chosen = [{"role": "assistant", "content": row["output"]}]
        rejected = [{"role": "assistant", "content": other["output"]}]
        if rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        sequences += [{"messages": prompt + chosen}, {"messages": prompt + rejected}]
    write_jsonl(pairs, tmp / "pairs.jsonl")
    write_jsonl(sequences, tmp / "sequences.jsonl")
    return tmp / "pairs.jsonl", tmp / "sequences.jsonl"


def chat_tokenizer(tmp: Path, rows: list[dict]) -> Path:
    target = tmp / "tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        make_tokenizer(rows, target, vocab_size=16000)
        settings = json.loads((target / "tokenizer_config.json").read_text())
        settings["chat_template"] = CHATML
        (target / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return target


def lmtune_run(name: str, kind: str, args, tmp: Path, model: Path, pairs: Path, sequences: Path) -> dict:
    work = tmp / name
    work.mkdir(exist_ok=True)
    cfg = work / "cfg.py"
    cfg.write_text(LMTUNE_CONFIG.format(model=str(model), pairs=str(pairs), sequences=str(sequences), kind=kind,
                                        max_length=MAX_LENGTH, packed=PACKED, accum=ACCUM,
                                        iters=args.steps * ACCUM))
    env = base_env(LMTUNE_CACHE=str(tmp / "cache" / name), OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmtune.cli", "train", str(cfg), "--work-dir", str(work / "run"),
                    "--overwrite"], env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    log_dir = sorted(p for p in (work / "run").iterdir() if p.is_dir() and p.name[:1].isdigit())[-1]
    scalars = [json.loads(line) for line in (log_dir / "scalars.jsonl").read_text().splitlines()]
    steps, seconds = [], 0.0
    for row in scalars:
        seconds += row["time"]
        if "step_tokens" in row and row["iter"] % ACCUM == 0:
            steps.append({"seconds": seconds, "tokens": row["step_tokens"]})
            seconds = 0.0
    return {"steps": steps, "peak_mib": scalars[-1]["memory"], "wall_s": wall}


def trl_run(name: str, shape: tuple[int, int], args, tmp: Path, model: Path, pairs: Path) -> dict:
    work = tmp / name
    work.mkdir(exist_ok=True)
    script = work / "trl_side.py"
    script.write_text(TRL_SIDE)
    batch, accum = shape
    env = base_env(OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    subprocess.run([args.trl_python, str(script), str(model), str(pairs), str(work), args.device, str(args.steps),
                    str(batch), str(accum), str(MAX_LENGTH)], env=env, check=True, capture_output=True, text=True)
    probe = json.loads((work / "probe.json").read_text())
    peak = probe["peak_gpu_mib"] if args.device == "cuda" else probe["peak_rss_mib"]
    return {"steps": probe["steps"], "peak_mib": peak, "wall_s": time.perf_counter() - start}


def rate(result: dict) -> float:
    later = result["steps"][1:]
    return sum(s["tokens"] for s in later) / max(sum(s["seconds"] for s in later), 1e-9)


def render(results: dict, args) -> str:
    lines = ["| run | non-pad tokens/s (steps after the first) | peak memory (MiB) | steps | wall s |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {rate(r):,.0f} | {r['peak_mib']:,.0f} | {len(r['steps'])} | {r['wall_s']:.0f} |")
    best_trl = max((rate(r) for n, r in results.items() if n.startswith("trl")), default=None)
    if "lmtune_dpo" in results and best_trl:
        lines.append("")
        lines.append(f"lmtune DPO / best TRL DPO tokens/s: {rate(results['lmtune_dpo']) / best_trl:.2f}x")
    if "lmtune_dpo" in results and "lmtune_sft" in results:
        ratio = results["lmtune_dpo"]["peak_mib"] / results["lmtune_sft"]["peak_mib"]
        lines.append(f"lmtune DPO step / SFT step on the same tokens, peak memory: {ratio:.3f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--trl-python", default=str(HERE / ".venv-trl/bin/python"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "work"
    tmp.mkdir(exist_ok=True)
    pairs, sequences = make_pairs(args.pairs, tmp)
    model = make_model(tmp, chat_tokenizer(tmp, make_rows(200, seed=11)), 32000)
    results = {}
    for name in args.runs.split(","):
        side, what = RUNS[name]
        results[name] = (lmtune_run(name, what, args, tmp, model, pairs, sequences) if side == "lmtune"
                         else trl_run(name, what, args, tmp, model, pairs))
        print(f"{name}: {rate(results[name]):,.0f} tokens/s, peak {results[name]['peak_mib']:,.0f} MiB", flush=True)
    (args.out / "dpo_speed.json").write_text(json.dumps(results, indent=1))
    text = render(results, args)
    (args.out / "dpo_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
