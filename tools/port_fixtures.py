"""Reference outputs of hub-code models, computed by their original code under transformers 4.

lmtune runs InternLM2, InternLM3 (and the other hub-code families) through its own ports on
transformers 5 (``lmtune.model.ports``). This script makes the fixtures its tests compare those ports
against: for each family, a tiny random checkpoint in the hub's own layout (``config.json`` with
``auto_map``, weights under the hub's names) and what the ORIGINAL modeling code computes on it:

- ``logits``: eval-mode logits of two fixed rows, fp32;
- ``loss``: the mean token loss of those rows (labels = inputs), train mode;
- ``grad.<name>``: the gradient of that loss for one weight of each kind that a port renames,
  splits or keeps (the fused attention projection among them), and ``lora_grad.<A|B>`` for a LoRA
  adapter (rank 4, fixed non-zero init) on the attention output projection of layer 0.

It runs in an environment with transformers 4.x and the original code: XTuner 0.2.0's wheel ships
InternLM2's and InternLM3's modeling files (``xtuner/_lite/modelings``), so the environment made by
``benchmarks/setup_xtuner_env.sh`` is enough:

    bash benchmarks/setup_xtuner_env.sh
    benchmarks/.venv-xtuner/bin/python tools/port_fixtures.py tests/fixtures/ports

The original code files are used from the installed package, never copied into the fixtures (a
fixture directory holds ``config.json``, ``model.safetensors`` and ``reference.safetensors``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SEED = 1234
ROWS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64, 11, 200, 31, 8],
                     [1, 300, 12, 77, 190, 45, 6, 2, 140, 260, 9, 55]])


def load_specs() -> dict:
    """Every family's fixtures: ``tools/port_refs/<module>.py`` each define ``SPECS`` (see internlm.py)."""
    specs: dict = {}
    folder = Path(__file__).parent / "port_refs"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # the specs share its _cache module
    for file in sorted(folder.glob("*.py")):
        if file.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"port_refs_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        specs.update(module.SPECS)
    return specs


def _perturb(model: torch.nn.Module) -> None:
    """Random weights that exercise everything: norms away from 1, biases away from 0."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0, 0.2)


def _lora(model: torch.nn.Module, target: str):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=[target], layers_to_transform=[0]))
    torch.manual_seed(SEED + 1)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.copy_(torch.randn_like(param) * 0.1)
    return peft_model


def _build_reference(hub_dir: Path) -> torch.nn.Module:
    """The original code's model of a hub dir, randomly initialised (the default ``build`` of a spec)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(hub_dir), trust_remote_code=True)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)


def make(name: str, spec: dict, out: Path) -> None:
    """One fixture. ``spec``: ``code`` (a function returning the dir of the original code files), ``files``
    (those to put beside config.json), ``hub`` (the config.json), ``grads`` (hub names of the weights whose
    gradients are recorded), ``lora_target`` (hub name of the module the LoRA adapter goes on), and
    optionally ``build`` (hub dir -> original model; default: the Auto classes with trust_remote_code)
    and ``rows`` (input ids; default ROWS)."""
    from safetensors.torch import save_file

    code, files, hub = spec["code"](), spec["files"], spec["hub"]
    grads, lora_target = spec["grads"], spec["lora_target"]
    rows = spec.get("rows", ROWS)
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        hub_dir = Path(tmp) / name
        hub_dir.mkdir()
        for file in files:
            shutil.copyfile(code / file, hub_dir / file)
        (hub_dir / "config.json").write_text(json.dumps(hub, indent=2))
        torch.manual_seed(SEED)
        model = spec.get("build", _build_reference)(hub_dir)
        _perturb(model)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k}
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(hub, indent=2) + "\n")

        reference: dict[str, torch.Tensor] = {"input_ids": rows.clone()}
        model.eval()
        with torch.no_grad():
            reference["logits"] = model(input_ids=rows, use_cache=False).logits.float()
        model.train()
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        loss.backward()
        reference["loss"] = loss.detach().reshape(1)
        params = dict(model.named_parameters())
        for weight in grads:
            reference[f"grad.{weight}"] = params[weight].grad.detach().clone()
        model.zero_grad()
        peft_model = _lora(model, lora_target)
        lora_loss = peft_model(input_ids=rows, labels=rows, use_cache=False).loss
        lora_loss.backward()
        reference["lora_loss"] = lora_loss.detach().reshape(1)
        for pname, param in peft_model.named_parameters():
            if "lora_" in pname:
                side = "A" if "lora_A" in pname else "B"
                reference[f"lora_weight.{side}"] = param.detach().clone()
                reference[f"lora_grad.{side}"] = param.grad.detach().clone()
        import transformers

        sources = {file: hashlib.sha256((code / file).read_bytes()).hexdigest()[:16] for file in files}
        save_file({k: v.contiguous() for k, v in reference.items()}, str(target / "reference.safetensors"),
                  metadata={"transformers": transformers.__version__, "lora_target": lora_target,
                            "code": json.dumps(sources), "made_by": "tools/port_fixtures.py"})
    print(f"{name}: {target} (loss {reference['loss'].item():.6f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="fixture root, e.g. tests/fixtures/ports")
    specs = load_specs()
    parser.add_argument("--only", nargs="+", choices=sorted(specs), help="fixtures to (re)make")
    args = parser.parse_args()
    for name in args.only or sorted(specs):
        make(name, specs[name], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
