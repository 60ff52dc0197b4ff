"""Reference outputs of hub-code models, computed by their original code under transformers 4.

lmtune runs InternLM2, InternLM3 (and the other hub-code families) through its own ports on
transformers 5 (``lmtune.ports``). This script makes the fixtures its tests compare those ports
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


def _xtuner_modeling(family: str) -> Path:
    spec = importlib.util.find_spec("xtuner")
    if spec is None or spec.origin is None:
        sys.exit("xtuner is not installed here: run this with benchmarks/.venv-xtuner/bin/python "
                 "(bash benchmarks/setup_xtuner_env.sh makes it)")
    return Path(spec.origin).parent / "_lite" / "modelings" / family


_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
             tie_word_embeddings=False, torch_dtype="float32")

# name -> (code dir, code files, hub config.json, weights to record gradients of, LoRA target (hub module name))
FAMILIES = {
    "internlm2": ("internlm2", ("configuration_internlm2.py", "modeling_internlm2.py"), {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        **_TINY, "num_key_value_heads": 2, "bias": False, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
        "rope_scaling": None, "hidden_act": "silu", "attn_implementation": "eager"},
        ("model.layers.0.attention.wqkv.weight", "model.layers.1.feed_forward.w1.weight", "output.weight",
         "model.tok_embeddings.weight"), "wo"),
    "internlm2_bias_dynamic": ("internlm2", ("configuration_internlm2.py", "modeling_internlm2.py"), {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        **{**_TINY, "max_position_embeddings": 8}, "num_key_value_heads": 4, "bias": True, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu",
        "attn_implementation": "eager"},
        ("model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wqkv.bias",
         "model.layers.0.attention.wo.bias"), "wo"),
    "internlm3": ("internlm3", ("configuration_internlm3.py", "modeling_internlm3.py"), {
        "architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3",
        "auto_map": {"AutoConfig": "configuration_internlm3.InternLM3Config",
                     "AutoModel": "modeling_internlm3.InternLM3Model",
                     "AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"},
        **_TINY, "num_key_value_heads": 2, "head_dim": 16, "qkv_bias": False, "bias": False, "rms_norm_eps": 1e-5,
        "rope_theta": 50000000, "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"}, "hidden_act": "silu"},
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"), "o_proj"),
}


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


def make(name: str, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    code_dir, files, hub, grads, lora_target = FAMILIES[name]
    code = _xtuner_modeling(code_dir)
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        hub_dir = Path(tmp) / name
        hub_dir.mkdir()
        for file in files:
            shutil.copyfile(code / file, hub_dir / file)
        (hub_dir / "config.json").write_text(json.dumps(hub, indent=2))
        config = AutoConfig.from_pretrained(str(hub_dir), trust_remote_code=True)
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
        _perturb(model)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k}
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(hub, indent=2) + "\n")

        reference: dict[str, torch.Tensor] = {"input_ids": ROWS.clone()}
        model.eval()
        with torch.no_grad():
            reference["logits"] = model(input_ids=ROWS, use_cache=False).logits.float()
        model.train()
        loss = model(input_ids=ROWS, labels=ROWS, use_cache=False).loss
        loss.backward()
        reference["loss"] = loss.detach().reshape(1)
        params = dict(model.named_parameters())
        for weight in grads:
            reference[f"grad.{weight}"] = params[weight].grad.detach().clone()
        model.zero_grad()
        peft_model = _lora(model, lora_target)
        lora_loss = peft_model(input_ids=ROWS, labels=ROWS, use_cache=False).loss
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
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="families to (re)make")
    args = parser.parse_args()
    for name in args.only or sorted(FAMILIES):
        make(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
