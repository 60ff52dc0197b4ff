"""GPU-only paths, checked once on a lent GPU machine (never part of the test run).

    python benchmarks/gpu_check.py OUT_DIR [--quick]

1. the demo trains on CUDA (bf16 autocast) and answers;
2. QLoRA with bitsandbytes' CUDA 4-bit kernels trains, exports an adapter, which
   `lmtune chat --bits 4` loads; `lmtune convert merge --device cuda` merges it into the
   bf16 base (merged logits vs base+adapter);
3. FSDP2 with one process (nccl) trains and resumes bit-exactly;
4. a packed batch gives the unpacked loss on CUDA (SDPA, bf16);
5. throughput of full and LoRA fine-tuning of a ~60M Llama (bf16, packed, max_length 1024).
Results go to OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED_CFG = ROOT / "lmtune" / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
RESULTS: dict = {}


def lmtune(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmtune.cli", *argv]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    print(f"$ lmtune {' '.join(argv)[:200]}  -> rc {done.returncode} in {time.monotonic() - start:.1f}s", flush=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-5000:], flush=True)
    return done


def losses(work: Path) -> list[float]:
    rows = []
    for log in sorted(work.glob("*/scalars.jsonl")):
        rows += [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in rows]


def step(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.monotonic()
            try:
                RESULTS[name] = {"ok": True, **(fn(*args, **kwargs) or {})}
            except Exception as exc:  # noqa: BLE001 - record and go on with the next check
                import traceback

                traceback.print_exc()
                RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            RESULTS[name]["seconds"] = round(time.monotonic() - start, 1)
            print(name, json.dumps(RESULTS[name])[:1500], flush=True)
        return run
    return wrap


@step("demo")
def check_demo(tmp: Path, quick: bool) -> dict:
    opts = ["--cfg-options", "max_epochs=4"] if quick else []
    done = lmtune("train", "demo", "--work-dir", str(tmp / "demo"), *opts)
    assert done.returncode == 0
    trace = losses(tmp / "demo")
    answers = [json.loads(line) for log in (tmp / "demo").glob("*/eval_chat.jsonl")
               for line in log.read_text().splitlines()]
    return {"first_loss": trace[0], "last_loss": trace[-1], "iters": len(trace),
            "last_answers": [a["output"] for a in answers if a["when"] == "after training"][:2]}


def oasst_data(tmp: Path) -> str:
    rows = [
        "### Human: What is the capital of France?### Assistant: The capital of France is Paris.",
        "### Human: Say hello.### Assistant: Hello!### Human: Again, louder.### Assistant: HELLO!",
        "### Human: Count to three.### Assistant: One, two, three.",
        "### Human: What is two plus two?### Assistant: Two plus two is four.",
    ]
    path = tmp / "oasst1" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows * 8))
    return str(path.parent)


def tiny_model(tmp: Path, name: str, **kwargs) -> str:
    from lmtune.tools.tiny_model import make_tiny_llama

    path = tmp / name
    if not (path / "config.json").is_file():
        make_tiny_llama(path, ["What is the capital of France? Paris. Hello! HELLO! One, two, three."], **kwargs)
    return str(path)


@step("qlora_cuda")
def check_qlora(tmp: Path, quick: bool) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.engine import checkpoint as ckpt

    model_dir = tiny_model(tmp, "llama256", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8,
                           num_kv_heads=4, intermediate_size=512)
    data = oasst_data(tmp)
    work = tmp / "qlora"
    done = lmtune("train", str(SEED_CFG), "--work-dir", str(work), "--cfg-options",
                  f"pretrained_model_name_or_path={model_dir}", f"data_path={data}", "max_length=128",
                  "train_cfg.max_epochs=None", "train_cfg.max_iters=30", "accumulative_counts=1",
                  "lr=1e-3", "save_steps=15", "evaluation_inputs=['Say hello.']", "evaluation_freq=1000",
                  "model.llm.quantization_config.bnb_4bit_compute_dtype=torch.bfloat16",
                  "model.llm.torch_dtype=torch.bfloat16", "optim_wrapper.dtype='bfloat16'")
    assert done.returncode == 0
    trace = losses(work)
    latest = ckpt.find_latest(work)
    adapter = tmp / "qlora_adapter"
    assert lmtune("convert", "pth_to_hf", str(latest / "config.py"), str(latest), str(adapter)).returncode == 0
    chat = lmtune("chat", model_dir, "--adapter", str(adapter), "--bits", "4", "--max-new-tokens", "8",
                  "--prompt", "Say hello.")
    assert chat.returncode == 0
    chat8 = lmtune("chat", model_dir, "--adapter", str(adapter), "--bits", "8", "--max-new-tokens", "8",
                   "--prompt", "Say hello.")
    merged = tmp / "merged"
    assert lmtune("convert", "merge", model_dir, str(adapter), str(merged), "--device", "cuda").returncode == 0
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]], device="cuda")
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).cuda().eval()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
        reference = PeftModel.from_pretrained(base, str(adapter)).eval()
        diff = (merged_model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    return {"first_loss": trace[0], "last_loss": trace[-1], "chat_bits4": chat.stdout.strip()[:100],
            "chat_bits8_rc": chat8.returncode, "chat_bits8": chat8.stdout.strip()[:100],
            "merge_cuda_max_logit_diff": diff}


@step("fsdp2_cuda_one_process")
def check_fsdp2(tmp: Path, quick: bool) -> dict:
    from safetensors.torch import load_file

    from lmtune.engine import checkpoint as ckpt

    model_dir = tiny_model(tmp, "llama256", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8,
                           num_kv_heads=4, intermediate_size=512)
    data = oasst_data(tmp)
    opts = [f"pretrained_model_name_or_path={model_dir}", f"data_path={data}", "max_length=128",
            "train_cfg.max_epochs=None", "train_cfg.max_iters=6", "accumulative_counts=1", "save_steps=3",
            "lr=1e-4", "model.llm.quantization_config=None", "model.lora=None", "custom_hooks=[]",
            "model.llm.torch_dtype=torch.float32", "optim_wrapper.dtype='bfloat16'"]
    work, resumed = tmp / "fsdp", tmp / "fsdp_resumed"
    assert lmtune("train", str(SEED_CFG), "--work-dir", str(work), "--strategy", "fsdp2",
                  "--cfg-options", *opts).returncode == 0
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(work / "iter_3"), str(resumed)], check=True)
    assert lmtune("train", str(SEED_CFG), "--work-dir", str(resumed), "--strategy", "fsdp2", "--resume",
                  "--cfg-options", *opts).returncode == 0
    a = load_file(str(ckpt.find_latest(work) / ckpt.WEIGHTS))
    b = load_file(str(ckpt.find_latest(resumed) / ckpt.WEIGHTS))
    return {"resume_max_diff": max((a[k] - b[k]).abs().max().item() for k in a), "losses": losses(work)}


@step("packing_exact_cuda_bf16")
def check_packing(tmp: Path, quick: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from lmtune.model.sft import SupervisedFinetune

    model_dir = tiny_model(tmp, "llama256", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8,
                           num_kv_heads=4, intermediate_size=512)
    model = SupervisedFinetune(llm=dict(type=AutoModelForCausalLM.from_pretrained,
                                        pretrained_model_name_or_path=model_dir, dtype=torch.bfloat16),
                               use_activation_checkpointing=False).cuda()
    return {"packing_leak": model.packing_leak(), "attn_implementation": model.llm.config._attn_implementation}


@step("throughput")
def check_throughput(tmp: Path, quick: bool) -> dict:
    """Real (non-pad, labelled) tokens/s of lmtune on a ~60M Llama, bf16, packed rows of 1024."""
    import random

    model_dir = tiny_model(tmp, "llama60m", vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8,
                           num_kv_heads=8, intermediate_size=1536, max_position_embeddings=2048)
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are or from at which an".split()
    rows = []
    for _ in range(2000):
        n_in, n_out = rng.randint(5, 60), rng.randint(20, 400)
        rows.append({"text": f"### Human: {' '.join(rng.choices(words, k=n_in))}"
                             f"### Assistant: {' '.join(rng.choices(words, k=n_out))}"})
    data = tmp / "oasst_long" / "train.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for mode in ("lora", "full"):
        work = tmp / f"tp_{mode}"
        opts = [f"pretrained_model_name_or_path={model_dir}", f"data_path={data.parent}", "max_length=1024",
                "batch_size=1", "train_cfg.max_epochs=None", "train_cfg.max_iters=40", "accumulative_counts=1",
                "save_steps=100000", "custom_hooks=[]", "model.llm.quantization_config=None",
                "model.llm.torch_dtype=torch.bfloat16", "optim_wrapper.dtype='bfloat16'",
                "default_hooks.logger.interval=1"]
        if mode == "full":
            opts.append("model.lora=None")
        start = time.monotonic()
        done = lmtune("train", str(SEED_CFG), "--work-dir", str(work), "--cfg-options", *opts, timeout=400)
        wall = time.monotonic() - start
        assert done.returncode == 0
        rows_ = [json.loads(line) for log in work.glob("*/scalars.jsonl") for line in log.read_text().splitlines()]
        steady = rows_[5:]
        seconds = sum(r["time"] for r in steady)
        tokens = sum(r.get("tokens", 0) for r in steady)
        out[mode] = {"wall_s": round(wall, 1), "iters_timed": len(steady), "sec_per_iter": seconds / len(steady),
                     "labelled_tokens_per_s": tokens / seconds if tokens else None,
                     "max_memory_mib": max(r.get("memory", 0) for r in rows_)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true", help="a short CPU smoke run of this script")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path("/tmp/lmtune_gpu_check")
    tmp.mkdir(exist_ok=True)
    RESULTS["env"] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    checks = {"demo": check_demo, "qlora": check_qlora, "fsdp2": check_fsdp2, "packing": check_packing,
              "throughput": check_throughput}
    for name, fn in checks.items():
        if args.only and name not in args.only:
            continue
        fn(tmp, args.quick)
        (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
