"""Does the original hub code load what lmtune exports from a ported family, with the trained logits?

Two steps, in two environments:

    # 1. lmtune (transformers 5): train a tiny hub-layout checkpoint of a ported family (full
    #    fine-tuning, and LoRA then merge), export both with `lmtune convert`, record the trained logits
    .venv/bin/python tools/port_export_check.py make /tmp/export_check --fixture internlm2 \\
        --code-dir benchmarks/.venv-xtuner/lib/python3.11/site-packages/xtuner/_lite/modelings/internlm2

    # 2. the original code (transformers 4.48, benchmarks/setup_xtuner_env.sh): load each export with it
    #    and compare its logits to the recorded ones (fp32, 1e-5)
    benchmarks/.venv-xtuner/bin/python tools/port_export_check.py verify /tmp/export_check

``--fixture`` names a fixture of tests/fixtures/ports (the tiny checkpoint trained); the original code
is that fixture's spec in tools/port_refs (``tools/port_fixtures.py``). Its code files are copied into
the tiny repository (from ``--code-dir`` where given, else from where the spec finds them), so the
exports carry them as a real checkpoint's export does (lmtune copies the source's code files).
``verify`` loads an export with ``from_pretrained(..., trust_remote_code=True)``, or, for a spec that
builds its reference model itself (code that needs shims to import), builds it from the export's
config.json and loads the export's weights into it, every key matched.
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


def _specs() -> dict:
    sys.path.insert(0, str(REPO / "tools"))
    from port_fixtures import load_specs

    return load_specs()


def _hub_dir(root: Path, fixture: str) -> Path:
    """The tiny hub-layout repository of ``fixture`` with a tokenizer in its family's style (tests/hub_models.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from hub_models import hub_dir_for

    try:
        return hub_dir_for(root, fixture)
    except KeyError as exc:
        sys.exit(str(exc))


def make(out: Path, fixture: str, code_dir: Path | None) -> None:
    from safetensors.torch import save_file

    from lmtune.engine.checkpoint import export as convert

    spec = _specs()[fixture]
    shutil.rmtree(out, ignore_errors=True)
    hub_dir = _hub_dir(out / "source", fixture)
    code_dir = code_dir or spec["code"]()
    for name in spec["files"]:
        shutil.copyfile(code_dir / name, hub_dir / name)  # the original code, as a real repository has it
    (out / "fixture.txt").write_text(fixture)
    expected = {"input_ids": ROWS}
    latest, expected["full"] = _train(hub_dir, out / "full_run", full=True)
    convert.pth_to_hf(None, latest, out / "full")
    latest, expected["merged"] = _train(hub_dir, out / "lora_run", full=False)
    adapter = convert.pth_to_hf(None, latest, out / "adapter")
    convert.merge(hub_dir, adapter, out / "merged")
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    print(f"exports in {out}/full and {out}/merged; now run `verify` with the original code's environment")


def _original(spec: dict, export: Path):
    """The export loaded by the original code."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if "build" not in spec:
        return AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True, torch_dtype=torch.float32)
    model = spec["build"](export)
    state = load_file(str(export / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()
                                                             if "inv_freq" not in k and "alibi" not in k}
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        sys.exit(f"{export}: the original model's weights and the export's differ: missing {missing}, "
                 f"unexpected {unexpected}")
    return model


def verify(out: Path) -> int:
    import transformers
    from safetensors.torch import load_file

    spec = _specs()[(out / "fixture.txt").read_text().strip()]
    expected = load_file(str(out / "expected.safetensors"))
    worst = 0.0
    for name in ("full", "merged"):
        config = json.loads((out / name / "config.json").read_text())
        model = _original(spec, out / name).to(torch.float32)
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
    make_p.add_argument("--fixture", default="internlm2", help="a fixture of tests/fixtures/ports (default internlm2)")
    make_p.add_argument("--code-dir", type=Path, help="the family's original code files (default: the spec's)")
    verify_p = sub.add_parser("verify", help="load the exports with the original code (transformers 4)")
    verify_p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.step == "make":
        make(args.out, args.fixture, args.code_dir)
        return 0
    return verify(args.out)


if __name__ == "__main__":
    sys.exit(main())
