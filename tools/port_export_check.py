"""Does the original hub code load what lmtune exports from a ported family, with the trained logits?

Two steps, in two environments:

    # 1. lmtune (transformers 5): train a tiny hub-layout InternLM2 (full fine-tuning, and LoRA then
    #    merge), export both with `lmtune convert`, and record the trained model's logits
    .venv/bin/python tools/port_export_check.py make /tmp/export_check \\
        --code-dir benchmarks/.venv-xtuner/lib/python3.11/site-packages/xtuner/_lite/modelings/internlm2

    # 2. the original code (transformers 4.48, benchmarks/setup_xtuner_env.sh): load each export with
    #    trust_remote_code=True and compare its logits to the recorded ones (fp32, 1e-5)
    benchmarks/.venv-xtuner/bin/python tools/port_export_check.py verify /tmp/export_check

``--code-dir`` holds the family's original code files; they are copied into the tiny repository, so
the exports carry them as a real checkpoint's export does (lmtune copies the source's code files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROWS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64, 11, 200, 31, 8]])
TOLERANCE = 1e-5


def _train(hub_dir: Path, work: Path, full: bool):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import OASST1_ROWS, write_jsonl

    from lmtune.config import Config
    from lmtune.engine import checkpoint as ckpt
    from lmtune.engine.runner import Runner

    data = write_jsonl(work / "data" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4).parent
    options = {"pretrained_model_name_or_path": str(hub_dir), "data_path": str(data), "max_length": 96,
               "max_epochs": 2, "accumulative_counts": 1, "lr": 1e-2, "save_steps": 1000, "evaluation_freq": 1000,
               "evaluation_inputs": ["Hi."], "max_new_tokens": 2, "model.llm.quantization_config": None,
               "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32"}
    if full:
        options["model.lora"] = None
    seed = REPO / "lmtune" / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"
    runner = Runner.from_config(Config.fromfile(seed, options), work_dir=str(work / "run"), seed=1)
    runner.train()
    model = runner.unwrapped_model.llm
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ROWS, use_cache=False).logits.float()
    return ckpt.find_latest(runner.work_dir), logits


def make(out: Path, code_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from hub_models import internlm2_dir
    from safetensors.torch import save_file

    from lmtune.tools import convert

    shutil.rmtree(out, ignore_errors=True)
    hub_dir = internlm2_dir(out / "source")
    for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
        shutil.copyfile(code_dir / name, hub_dir / name)  # the original code, as a real repository has it
    expected = {"input_ids": ROWS}
    latest, expected["full"] = _train(hub_dir, out / "full_run", full=True)
    convert.pth_to_hf(None, latest, out / "full")
    latest, expected["merged"] = _train(hub_dir, out / "lora_run", full=False)
    adapter = convert.pth_to_hf(None, latest, out / "adapter")
    convert.merge(hub_dir, adapter, out / "merged")
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    print(f"exports in {out}/full and {out}/merged; now run `verify` with the original code's environment")


def verify(out: Path) -> int:
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    expected = load_file(str(out / "expected.safetensors"))
    worst = 0.0
    for name in ("full", "merged"):
        config = json.loads((out / name / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(str(out / name), trust_remote_code=True,
                                                     torch_dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"], use_cache=False).logits.float()
        diff = float((logits - expected[name]).abs().max())
        worst = max(worst, diff)
        print(f"{name}: {type(model).__module__}.{type(model).__name__} (model_type {config['model_type']}, "
              f"transformers {transformers.__version__}): max |logit difference| {diff:.2e}")
    ok = worst <= TOLERANCE
    print("OK" if ok else f"FAILED: above {TOLERANCE:g}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    make_p = sub.add_parser("make", help="train, export and record logits (lmtune's environment)")
    make_p.add_argument("out", type=Path)
    make_p.add_argument("--code-dir", type=Path, required=True, help="the family's original code files")
    verify_p = sub.add_parser("verify", help="load the exports with the original code (transformers 4)")
    verify_p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.step == "make":
        make(args.out, args.code_dir)
        return 0
    return verify(args.out)


if __name__ == "__main__":
    sys.exit(main())
