"""Sequence parallelism: step time and peak memory per process for one long row split over 1, 2, ... processes,
lmtune against XTuner 0.2.0 in one invocation (issue 18).

Each (side, size) runs as its own ``torchrun`` job (gloo on the CPU, nccl on GPUs): every process builds the same
random Llama-style model (grouped-query attention, transformers' sdpa attention, full fine-tuning) and runs
forward + backward + the gradient all-reduce on one row of ``--tokens`` tokens. At size N each process gets
``1/N`` of the row and every layer's attention reaches the whole row through the Ulysses exchange.

* lmtune: ``lmtune.model.sft.SupervisedFinetune`` (the chunked loss, lmtune's packed SDPA), the row split by
  ``lmtune.engine.strategies.sequence_parallel.shard_batch``.
* XTuner (with the python of ``benchmarks/.venv-xtuner``, transformers 4.48): ``xtuner.model.SupervisedFinetune``
  after ``xtuner.parallel.sequence.init_sequence_parallel``; its ``compute_loss`` splits the row. XTuner needs a
  process group even for one process. ``--peer none`` leaves it out (also on GPUs, where its environment has no
  CUDA build).

The row is one sample by default: XTuner keeps packed samples apart only with flash-attn's variable-length kernel,
so on its sdpa path a packed row would attend across its samples. ``--samples N`` packs N samples of awkward lengths
instead (lmtune alone then means what a packed row costs it).

The figures: step time, the median of ``--steps`` timed steps after one warm-up step (the all-reduce included);
peak memory per process, what the step adds to the memory held before it (the model and its gradients) at its
highest: the activations, the logits and what the backward pass holds besides. On the CPU that is the resident
set's high-water mark (``VmHWM``, reset before each step through ``/proc/self/clear_refs``; glibc is told to give
blocks of 128 KiB and more back to the system when they are freed, so the resident set follows what is held); on
GPUs ``torch.cuda.max_memory_allocated``. Also the step's loss (the same at every size: the split is exact). With
and without activation checkpointing (on by default in both tools). On the CPU a job's processes share the cores
(``torch.set_num_threads(cores // N)``), so the step time says what the exchange costs, not what more devices give.

    .venv/bin/python benchmarks/sequence_parallel.py                      # CPU: 8k tokens, sizes 1 and 2
    .venv/bin/python benchmarks/sequence_parallel.py --tokens 16384 --sizes 1 2 4 --peer none
    # on a machine with N GPUs (nccl; the model is bfloat16 there):
    python benchmarks/sequence_parallel.py --device cuda --peer none --tokens 131072 --sizes 1 2 4 8 \\
        --hidden 2048 --layers 8

``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
XTUNER_PYTHON = HERE / ".venv-xtuner" / "bin" / "python"
XTUNER_STUBS = HERE / "xtuner_stubs"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """The most a block of code adds to the memory the process holds (bytes, in ``peak``)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current size
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.before


def long_row(tokens: int, vocab: int, samples: int, seed: int = 0):
    """One row of ``tokens`` tokens: one sample, or ``samples`` packed samples of awkward lengths (the last takes
    the rest); the first half of the first sample is an untrained prompt."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths, left = [], tokens
    for share in (0.31, 0.07, 0.23, 0.013, 0.11, 0.05)[:max(samples - 1, 0)]:
        n = int(tokens * share) + 3
        lengths.append(n)
        left -= n
    lengths.append(left)
    ids = torch.randint(3, vocab, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, :lengths[0] // 2] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, lengths


def _setup(args, needs_group: bool):
    """This process's device, dtype, model config and size; the process group when there is more than one process
    (or when ``needs_group``)."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig

    size = int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    if size > 1 or needs_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.tokens,
                         attn_implementation="sdpa")
    return device, (torch.bfloat16 if cuda else torch.float32), config, size


def _measure(args, model, step, device, size: int, checkpointing: bool, tokens_per_process: int,
             samples: int) -> dict:
    """Warm-up, then ``args.steps`` timed steps: the row of results (the slowest rank's memory)."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]

    def full_step() -> float:
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: held before the step
        loss = step()
        if size > 1:
            for p in params:
                dist.all_reduce(p.grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    full_step()  # warm-up: allocates the gradients
    times, peaks = [], []
    for _ in range(args.steps):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            loss = full_step()
            times.append(time.perf_counter() - start)
        peaks.append(memory.peak)
    peak = torch.tensor([max(peaks)], dtype=torch.float64, device=device)
    if size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"size": size, "checkpointing": checkpointing, "tokens": args.tokens, "samples": samples,
            "tokens_per_process": tokens_per_process, "step_s": statistics.median(times),
            "peak_mib": float(peak) / 2**20, "loss": loss}


def lmtune_worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from lmtune.core.dist import init_sequence_parallel
    from lmtune.engine.strategies.sequence_parallel import shard_batch
    from lmtune.model.sft import SupervisedFinetune

    device, dtype, config, size = _setup(args, needs_group=False)
    init_sequence_parallel(size)
    checkpointing = args.checkpointing == "on"
    torch.manual_seed(0)  # the same weights on every rank
    model = SupervisedFinetune(LlamaForCausalLM(config).to(dtype), use_activation_checkpointing=checkpointing)
    model.to(device)
    batch, lengths = long_row(args.tokens, args.vocab, args.samples)
    part = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in shard_batch(batch).items()}
    trained = int((batch["labels"][:, 1:] != -100).sum())

    def step() -> float:
        out = model(**part)
        # this slice's share of the row's mean loss: summed over the ranks, the gradients are the row's
        (out["loss_sum"] / trained).backward()
        loss = out["loss_sum"].detach().float()
        if size > 1:
            dist.all_reduce(loss)
        return float(loss) / trained

    return _measure(args, model, step, device, size, checkpointing, part["input_ids"].shape[1], len(lengths))


def xtuner_worker(args) -> dict:
    import torch
    from mmengine.config import ConfigDict
    from transformers import LlamaForCausalLM
    from xtuner.model import SupervisedFinetune
    from xtuner.parallel.sequence import init_sequence_parallel

    device, dtype, config, size = _setup(args, needs_group=True)  # its attention asks for the rank
    init_sequence_parallel(size)
    checkpointing = args.checkpointing == "on"
    torch.manual_seed(0)
    # XTuner builds its model from a config that names a model directory (a model object fails in its 0.2.0)
    model_dir = Path(args.worker_out).with_name(f"xtuner_model_rank{os.environ.get('RANK', 0)}")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    llm = ConfigDict(type=LlamaForCausalLM.from_pretrained, pretrained_model_name_or_path=str(model_dir),
                     torch_dtype=dtype)
    model = SupervisedFinetune(llm=llm, use_activation_checkpointing=checkpointing)
    model.to(device).train()
    batch, lengths = long_row(args.tokens, args.vocab, args.samples)

    def step() -> float:
        data = {k: v.to(device) for k, v in batch.items()}  # XTuner's compute_loss splits the row itself
        loss = model(data, mode="loss")["loss"]  # the mean over the row's target tokens (reduced over ranks)
        loss.backward()
        return float(loss.detach())

    return _measure(args, model, step, device, size, checkpointing, args.tokens // size, len(lengths))


def run_job(args, side: str, size: int, checkpointing: str, out: Path) -> dict:
    """One setting in a job of its own (two models built one after the other in one process do not time alike)."""
    python = str(XTUNER_PYTHON) if side == "xtuner" else sys.executable
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={size}", __file__,
           "--worker", side, "--worker-out", str(out), "--device", args.device, "--tokens", str(args.tokens),
           "--samples", str(args.samples), "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--heads", str(args.heads), "--vocab", str(args.vocab), "--steps", str(args.steps),
           "--checkpointing", checkpointing]
    # glibc gives blocks of 128 KiB and more back to the system when they are freed (no adaptive threshold), so the
    # resident set follows what the step holds instead of what the warm-up step left in the heap
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // size)),
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    if side == "xtuner":
        env["PYTHONPATH"] = str(XTUNER_STUBS)
    subprocess.run(cmd, env=env, check=True)
    return {**json.loads(out.read_text()), "side": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="length of the row")
    parser.add_argument("--samples", type=int, default=1, help="samples packed in the row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes to run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="activation checkpointing (on by default in both tools)")
    parser.add_argument("--peer", choices=("xtuner", "none"), default="xtuner",
                        help="xtuner: also run XTuner 0.2.0 (benchmarks/setup_xtuner_env.sh makes its environment)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", choices=("lmtune", "xtuner"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = (lmtune_worker if args.worker == "lmtune" else xtuner_worker)(args)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.worker_out).write_text(json.dumps(row))
        return
    if args.samples > 1 and args.peer == "xtuner":
        parser.error("--samples > 1 packs samples that XTuner's sdpa attention would not keep apart: add --peer none")
    sides = ["lmtune"] + (["xtuner"] if args.peer == "xtuner" else [])
    if "xtuner" in sides and not XTUNER_PYTHON.is_file():
        parser.error(f"no {XTUNER_PYTHON}: run benchmarks/setup_xtuner_env.sh, or add --peer none")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        modes = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}[args.checkpointing]
        for mode in modes:
            for size in args.sizes:
                for side in sides:  # interleaved: a slow spell of the machine touches both sides
                    rows.append(run_job(args, side, size, mode, Path(tmp) / f"{side}{size}{mode}.json"))
    print(f"\none row of {args.tokens:,} tokens ({args.samples} sample(s)), Llama {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads ({max(1, args.heads // 2)} key/value), vocab {args.vocab}, "
          f"full fine-tuning, {args.device}")
    print("| activation checkpointing | size | side | tokens per process | step time | vs size "
          f"{args.sizes[0]} | peak memory per process | vs size {args.sizes[0]} | loss |"
          + (" lmtune / XTuner: time, memory |" if len(sides) > 1 else ""))
    print("|---" * (10 if len(sides) > 1 else 9) + "|")
    index = {(r["side"], r["checkpointing"], r["size"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["checkpointing"], r["size"], r["side"])):
        b = index[(r["side"], r["checkpointing"], args.sizes[0])]
        line = (f"| {'on' if r['checkpointing'] else 'off'} | {r['size']} | {r['side']} | {r['tokens_per_process']:,} "
                f"| {r['step_s']:.2f} s | {r['step_s'] / b['step_s']:.2f} | {r['peak_mib']:.0f} MiB "
                f"| {r['peak_mib'] / b['peak_mib']:.2f} | {r['loss']:.6f} |")
        if len(sides) > 1:
            peer = index.get(("xtuner", r["checkpointing"], r["size"]))
            line += (f" {r['step_s'] / peer['step_s']:.2f}, {r['peak_mib'] / peer['peak_mib']:.2f} |"
                     if r["side"] == "lmtune" and peer else " |")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
