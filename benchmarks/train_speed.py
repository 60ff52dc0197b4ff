"""Training throughput and memory, side by side: lmtune, XTuner 0.2.0 and TRL's SFTTrainer.

    python benchmarks/train_speed.py OUT_DIR [--device cpu|cuda] [--steps N] [--runs NAME,...]
        [--vocab 32000] [--memory-vocab 128000] [--xtuner-python PY] [--trl-python PY]

Every side trains the same locally created Llama (hidden 512, 4 layers, 8 heads, MLP 1536, untied
head; vocab 32k: 46M parameters, 30M of them outside the embedding) with LoRA r=64 on every linear
layer of the decoder, max_length 1024, 16 sequences per optimizer step, activation checkpointing on,
AdamW lr 2e-4, on the same 2000 alpaca rows (benchmarks/data_pipeline.py's generator: long-tailed
lengths, mean ~260 tokens) with the loss on the answers only. Runs (``--runs``, default all):

- ``lmtune``: packed rows (best fit), 1 row x 16 accumulation, fp32 (``OptimWrapper``);
- ``lmtune_bf16``: the same with lmtune's default CPU precision (bf16 autocast, bf16 frozen weights);
- ``lmtune_bf16_compile``: ``lmtune_bf16`` with ``model.torch_compile=True`` (each decoder layer compiled);
- ``xtuner_packed``: XTuner's ``pack_to_max_length=True``, 1 x 16, fp32 (mmengine's AmpOptimWrapper
  needs a GPU, so XTuner runs fp32 with OptimWrapper on a CPU);
- ``xtuner_unpacked``: XTuner without packing, batch 1 x 16, fp32;
- ``trl_packing``: TRL ``packing=True`` (best-fit decreasing, padding-free), 1 x 16, fp32;
- ``trl_default``: TRL's defaults (padding to the longest of a batch of 16), 16 x 1, fp32;
- ``lmtune_mem`` and ``trl_default_mem``: lmtune and TRL default at vocab ``--memory-vocab`` (128k),
  for peak memory (3 steps).

lmtune and XTuner run the very same config file (an XTuner-style config the script writes; lmtune
runs XTuner configs unchanged) through ``lmtune train`` and XTuner's ``tools/train.py``, both measured
by benchmarks/speed_probe.py; TRL runs a small script in its own environment, measured the same way.
Measured per side: real (non-pad) tokens per second over the optimizer steps after the first, wall
time per step (data loading and every hook included), time from process start to the end of the
first step, peak RSS (on GPUs: peak allocated memory), and MFU: 4 x N x tokens/s (LoRA: forward and
input gradients; N = parameters outside the input embedding) over the matmul rate measured here in
the dtype of the run (torch.mm of 2048x2048 matrices). Writes OUT_DIR/train_speed.json and
OUT_DIR/train_speed.md (a Markdown table with the ratios); docs/benchmarks.md has the method and results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from data_pipeline import XTUNER_STUBS, base_env, make_rows, make_tokenizer, write_jsonl  # noqa: E402

HIDDEN, LAYERS, HEADS, MLP = 512, 4, 8, 1536

CONFIG = '''\
# Written by benchmarks/train_speed.py. An XTuner 0.2.0 config: `lmtune train` and XTuner's
# tools/train.py run this same file.
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper, OptimWrapper  # noqa: F401
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer

from speed_probe import SpeedProbe, alpaca_same_text_map_fn
from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

pretrained_model_name_or_path = {model!r}
data_path = {data!r}
max_length = 1024
pack_to_max_length = {pack}
batch_size = {batch}
accumulative_counts = {accum}
max_iters = {iters}

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
                 trust_remote_code=True, padding_side="right")
model = dict(
    type=SupervisedFinetune,
    use_activation_checkpointing=True,{model_extra}
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
             trust_remote_code=True, torch_dtype=torch.{model_dtype}),
    lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))

train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=dict(train=data_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_same_text_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=False)
train_dataloader = dict(batch_size=batch_size, num_workers=0, dataset=train_dataset,
                        sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=dict(type=default_collate_fn, use_varlen_attn=False))

optim_wrapper = dict(type={wrapper},
                     optimizer=dict(type=AdamW, lr=2e-4, betas=(0.9, 0.999), weight_decay=0),
                     clip_grad=dict(max_norm=1, error_if_nonfinite=False),
                     accumulative_counts=accumulative_counts{wrapper_args})
param_scheduler = None
train_cfg = dict(type=TrainLoop, max_iters=max_iters)

custom_hooks = [dict(type=SpeedProbe, out_file={probe!r}, accumulative_counts=accumulative_counts,
                     pad_token_id={pad})]
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=accumulative_counts),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=-1, save_last=False),
    sampler_seed=dict(type=DistSamplerSeedHook))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
'''

TRL_SIDE = r'''
import json, os, resource, sys, time
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data, out, device, steps, packing, batch, accum = sys.argv[1:9]
steps, packing, batch, accum, cuda = int(steps), packing == "1", int(batch), int(accum), device == "cuda"
tok = AutoTokenizer.from_pretrained(model_dir)
rows = load_dataset("json", data_files=data, split="train")
rows = rows.filter(lambda r: r["output"] != "<nooutput>")
rows = rows.map(lambda r: {"prompt": r["instruction"] + ("\n" + r["input"] if r["input"] else ""),
                           "completion": r["output"]}, remove_columns=rows.column_names)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accum, learning_rate=2e-4, logging_steps=1, report_to=[],
                 save_strategy="no", max_length=1024, packing=packing, gradient_checkpointing=True,
                 bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, seed=0)
stats = {"steps": [], "pending": [0, 0]}


def sync():
    if cuda: torch.cuda.synchronize()


class Counting(SFTTrainer):
    def training_step(self, model, inputs, *rest, **kw):
        mask = inputs.get("attention_mask")
        stats["pending"][0] += int(mask.sum()) if mask is not None and not packing else inputs["input_ids"].numel()
        stats["pending"][1] += int((inputs["labels"][:, 1:] >= 0).sum())
        return super().training_step(model, inputs, *rest, **kw)


class Timer(TrainerCallback):
    def on_train_begin(self, *a, **k):
        sync(); stats["last"] = time.perf_counter()

    def on_step_end(self, *a, **k):
        sync(); now = time.perf_counter()
        stats["steps"].append({"seconds": now - stats["last"], "tokens": stats["pending"][0],
                               "labelled": stats["pending"][1]})
        stats["last"], stats["pending"] = now, [0, 0]
        stats.setdefault("first_step_s", time.time() - float(os.environ["BENCH_T0"]))


lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = Counting(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora,
                   callbacks=[Timer()])
if cuda: torch.cuda.reset_peak_memory_stats()
trainer.train()
json.dump({"steps": stats["steps"], "first_step_s": stats.get("first_step_s"),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None},
          open(os.path.join(out, "probe.json"), "w"))
'''


def make_model(tmp: Path, tokenizer_dir: Path, vocab: int) -> Path:
    """The Llama at ``vocab`` (the tokenizer's ids are its first rows; the rest are never seen), saved
    with the tokenizer so that every side loads one directory."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp / f"llama_v{vocab}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(target))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, target / f.name)
    return target


def non_embedding_params(vocab: int) -> int:
    layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
    return LAYERS * layer + HIDDEN + vocab * HIDDEN  # decoder layers, final norm, output head


def matmul_rate(dtype: str, device: str) -> float:
    """FLOP/s of torch.mm on 2048x2048 matrices in this process: the best of 10 timings after a warm-up
    (the machine's peak for that dtype; on a shared machine the best one is the least disturbed)."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(2048, 2048, dtype=kind, device=device)
    b = torch.randn(2048, 2048, dtype=kind, device=device)
    repeat = 20 if device == "cuda" else 2
    best = float("inf")
    for i in range(11):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, (time.perf_counter() - t0) / repeat)
    return 2 * 2048**3 / best


RUNS = {  # name: (side, packed, batch, accumulation, dtype, vocab kind)
    "lmtune": ("lmtune", True, 1, 16, "fp32", "speed"),
    "lmtune_bf16": ("lmtune", True, 1, 16, "bf16", "speed"),
    "lmtune_bf16_compile": ("lmtune", True, 1, 16, "bf16", "speed"),
    "xtuner_packed": ("xtuner", True, 1, 16, "fp32", "speed"),
    "xtuner_unpacked": ("xtuner", False, 1, 16, "fp32", "speed"),
    "trl_packing": ("trl", True, 1, 16, "fp32", "speed"),
    "trl_default": ("trl", False, 16, 1, "fp32", "speed"),
    "lmtune_mem": ("lmtune", True, 1, 16, "fp32", "memory"),
    "trl_default_mem": ("trl", False, 16, 1, "fp32", "memory"),
}


def run_one(name: str, args, tmp: Path, models: dict, data: Path, pad: int) -> dict:
    side, packed, batch, accum, dtype, kind = RUNS[name]
    if args.device == "cuda":
        batch, accum, dtype = 16, 1, "bf16"  # one GPU step holds the 16 sequences; bf16 everywhere
    steps = args.steps if kind == "speed" else args.memory_steps
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "probe.json"
    probe.unlink(missing_ok=True)
    model = str(models[kind])
    env = base_env(PYTHONPATH=str(HERE))
    if side == "trl":
        script = work / "trl_side.py"
        script.write_text(TRL_SIDE)
        cmd = [args.trl_python, str(script), model, str(data), str(work), args.device, str(steps),
               "1" if packed else "0", str(batch), str(accum)]
    else:
        bf16 = dtype == "bf16"
        cfg = work / "bench_cfg.py"
        cfg.write_text(CONFIG.format(
            model=model, data=str(data), pack=packed, batch=batch, accum=accum, iters=steps * accum,
            model_dtype="bfloat16" if bf16 else "float32", probe=str(probe), pad=pad,
            wrapper="AmpOptimWrapper" if bf16 else "OptimWrapper",
            wrapper_args=', dtype="bfloat16"' if bf16 else "",
            model_extra="\n    torch_compile=True," if name.endswith("_compile") else ""))
        if side == "lmtune":
            cmd = [sys.executable, "-m", "lmtune.cli", "train", str(cfg), "--work-dir", str(work / "run")]
        else:
            train_py = subprocess.run([args.xtuner_python, "-c", "import xtuner, os; print(os.path.dirname("
                                       "xtuner.__file__))"], capture_output=True, text=True,
                                      env=base_env(PYTHONPATH=str(XTUNER_STUBS))).stdout.strip()
            env["PYTHONPATH"] = f"{XTUNER_STUBS}:{HERE}"
            env["PATH"] = f"{Path(args.xtuner_python).parent}:{env['PATH']}"
            cmd = [args.xtuner_python, f"{train_py}/tools/train.py", str(cfg), "--work-dir", str(work / "run")]
    env["BENCH_T0"] = repr(time.time())
    cap = args.memory_cap_gib * 2**30
    peak = 0
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))
        while proc.poll() is None:  # a watchdog: a side that outgrows the machine is stopped, not the machine
            peak = max(peak, _rss(proc.pid))
            if peak > cap:
                proc.kill()
                proc.wait()
                return {"error": f"stopped: resident memory passed {args.memory_cap_gib} GiB", "over_cap": True,
                        "peak_rss_mib": peak / 2**20, "dtype": dtype,
                        "vocab": args.vocab if kind == "speed" else args.memory_vocab}
            time.sleep(0.2)
    if proc.returncode != 0 or not probe.is_file():
        tail = (work / "log.txt").read_text()[-2500:]
        return {"error": f"exit {proc.returncode}; log {work / 'log.txt'}:\n{tail}"}
    stats = json.loads(probe.read_text())
    timed = stats["steps"][1:]  # the first step (allocations, lazy init) is not timed
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    every = stats["steps"]
    return {"side": side, "packed": packed, "batch": batch, "accumulation": accum, "dtype": dtype,
            "vocab": args.vocab if kind == "speed" else args.memory_vocab, "steps": every,
            "tokens_per_s": tokens / seconds if seconds else None,
            "sec_per_step": seconds / len(timed) if timed else None,
            "tokens_per_step": tokens / len(timed) if timed else None,
            "labelled_share": sum(s["labelled"] for s in every) / max(sum(s["tokens"] for s in every), 1),
            "first_step_s": stats["first_step_s"], "peak_rss_mib": stats["peak_rss_mib"],
            "peak_gpu_mib": stats["peak_gpu_mib"]}


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def median_runs(rounds: list[dict], names: list[str]) -> dict:
    """Per run, the round with its median tokens/s (the lower middle one for an even count), with every
    round's tokens/s in ``tokens_per_s_rounds``; a run that never succeeded keeps its last error."""
    runs = {}
    for name in names:
        tried = [r[name] for r in rounds if name in r]
        if not tried:
            continue
        ok = sorted((r for r in tried if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"])
        if not ok:
            runs[name] = tried[-1]
            continue
        runs[name] = dict(ok[(len(ok) - 1) // 2], tokens_per_s_rounds=[r.get("tokens_per_s") for r in tried])
    return runs


def paired_ratios(rounds: list[dict], a: str, b: str) -> list[float]:
    """tokens/s of ``a`` over ``b`` within each round where both ran."""
    return [r[a]["tokens_per_s"] / r[b]["tokens_per_s"] for r in rounds
            if r.get(a, {}).get("tokens_per_s") and r.get(b, {}).get("tokens_per_s")]


def render(results: dict) -> str:
    rates = results["matmul_flops"]
    runs = results["runs"]
    n = results["non_embedding_params"]

    def ratio(a: str, b: str) -> str:
        x, y = runs.get(a, {}).get("tokens_per_s"), runs.get(b, {}).get("tokens_per_s")
        return f"{x / y:.2f}x" if x and y else "-"

    memory = "peak GPU MiB" if results["device"] != "cpu" else "peak RSS MiB"
    lines = [f"| run | dtype | tokens/s | s/step | tokens/step | time to 1st step (s) | {memory} | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        if r.get("over_cap"):
            lines.append(f"| {name} (vocab {r.get('vocab', '')}) | | | | | | > {r['peak_rss_mib']:,.0f} "
                         f"(stopped) | |")
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[0]} | | | | | | |")
            continue
        mem = r["peak_gpu_mib"] if results["device"] != "cpu" else r["peak_rss_mib"]
        if r["vocab"] != results["vocab"]:
            lines.append(f"| {name} (vocab {r['vocab']}) | {r['dtype']} | | | | {r['first_step_s']:.0f} "
                         f"| {mem:,.0f} | |")
            continue
        mfu = 4 * n * r["tokens_per_s"] / rates[r["dtype"]]
        lines.append(f"| {name} | {r['dtype']} | {r['tokens_per_s']:,.0f} | {r['sec_per_step']:.1f} | "
                     f"{r['tokens_per_step']:,.0f} | {r['first_step_s']:.0f} | {mem:,.0f} | {mfu:.0%} |")
    lines.append("")
    rounds = results.get("rounds", [])
    if len(rounds) > 1:
        lines.append(f"Medians of {len(rounds)} interleaved rounds; tokens/s of each round: "
                     + "; ".join(f"{name} " + ", ".join(f"{t:,.0f}" for t in r.get("tokens_per_s_rounds", []) if t)
                                 for name, r in runs.items() if r.get("tokens_per_s_rounds")) + ".")
        for a, b in (("lmtune", "xtuner_packed"), ("lmtune_bf16", "xtuner_packed"), ("lmtune", "trl_packing")):
            pairs = paired_ratios(rounds, a, b)
            if len(pairs) > 1:
                lines.append(f"{a} / {b} within each round: " + ", ".join(f"{x:.2f}x" for x in pairs) + ".")
    lines.append(f"lmtune fp32 / XTuner packed: {ratio('lmtune', 'xtuner_packed')}; / XTuner unpacked: "
                 f"{ratio('lmtune', 'xtuner_unpacked')}; / TRL packing: {ratio('lmtune', 'trl_packing')}; "
                 f"/ TRL default: {ratio('lmtune', 'trl_default')}. lmtune bf16 / XTuner packed: "
                 f"{ratio('lmtune_bf16', 'xtuner_packed')}.")
    a, b = runs.get("lmtune_mem", {}), runs.get("trl_default_mem", {})
    key = "peak_gpu_mib" if results["device"] != "cpu" else "peak_rss_mib"
    if a.get(key) and b.get(key):
        bound = "< " if b.get("over_cap") else ""
        lines.append(f"Peak memory at vocab {results['memory_vocab']}: lmtune / TRL default = "
                     f"{bound}{a[key] / b[key]:.2f}.")
    lines.append("Matmul rate (torch.mm 2048^3): " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in rates.items())
                 + f"; N (outside the embedding) = {n / 1e6:.1f}M.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per throughput run (first untimed)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--memory-vocab", type=int, default=128000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--work-dir", default="/tmp/lmtune_train_speed")
    parser.add_argument("--memory-cap-gib", type=float,
                        default=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 * 0.75, 1),
                        help="stop a side whose resident memory passes this (default: 75%% of the machine's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds of the throughput runs; the table shows each run's median")
    parser.add_argument("--xtuner-python", default=str(HERE / ".venv-xtuner/bin/python"))
    parser.add_argument("--trl-python", default=str(HERE / ".venv-trl/bin/python"))
    args = parser.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.work_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / f"alpaca_{args.rows}.jsonl"
    rows = make_rows(args.rows, seed=0)
    if not data.is_file():
        write_jsonl(rows, data)
    tokenizer_dir = tmp / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        make_tokenizer(rows, tokenizer_dir, vocab_size=16000)  # below every model vocab
    models = {"speed": make_model(tmp, tokenizer_dir, args.vocab),
              "memory": make_model(tmp, tokenizer_dir, args.memory_vocab)}
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(str(tokenizer_dir)).pad_token_id
    results: dict = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "vocab": args.vocab, "memory_vocab": args.memory_vocab,
        "non_embedding_params": non_embedding_params(args.vocab),
        "matmul_flops": {d: matmul_rate(d, args.device) for d in ("fp32", "bf16")},
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "runs": {}}
    speed = [n for n in names if RUNS[n][5] == "speed"]
    results["rounds"] = []
    for round_no in range(args.repeat):
        # interleaved rounds, every other one in reverse order: a shared machine's speed drifts over minutes
        order = speed if round_no % 2 == 0 else speed[::-1]
        if round_no == 0:
            order = order + [n for n in names if n not in speed]  # memory runs: once
        results["rounds"].append({})
        for name in order:
            t0 = time.monotonic()
            result = run_one(name, args, tmp, models, data, pad)
            result["wall_s"] = time.monotonic() - t0
            results["rounds"][-1][name] = result
            results["runs"] = median_runs(results["rounds"], names)
            print(name, json.dumps({k: v for k, v in result.items() if k != "steps"})[:1500], flush=True)
            (out / "train_speed.json").write_text(json.dumps(results, indent=2))
    after = {d: matmul_rate(d, args.device) for d in ("fp32", "bf16")}  # again, once the runs are done
    results["matmul_flops_before_after"] = {d: [results["matmul_flops"][d], after[d]] for d in after}
    results["matmul_flops"] = {d: max(results["matmul_flops"][d], after[d]) for d in after}
    (out / "train_speed.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    (out / "train_speed.md").write_text(table + "\n")
    print("\n" + table)
    return 0 if all("error" not in r for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
