"""Hub-code families on transformers 5 (lmtune.model.ports), exact against their original code.

The fixtures (tests/fixtures/ports/<name>) hold tiny random checkpoints in each hub layout and what
the family's ORIGINAL modeling code computed on them under transformers 4.48 (tools/port_fixtures.py):
logits, the loss, gradients of the weights a port renames or splits, and the gradients of a LoRA
adapter. Each port must reproduce them in fp32 to 1e-5, load the checkpoint as stored and save it
back bit for bit, keep packed samples apart, and tokenize as the sentencepiece library does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_models import FIXTURES, INTERNLM2_SPECIALS, STAND_IN_CODE, internlm2_dir, sentencepiece_ids
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.core_model_loading import revert_weight_conversion

from lmtune.config.build import build
from lmtune.model import ports

PORTED = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
TOL = dict(atol=1e-5, rtol=1e-5)


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "reference.safetensors"))


def _load(path, **kwargs):
    return ports.from_pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("name", PORTED)
@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_port_loads_the_hub_checkpoint_without_its_code_and_gives_the_original_logits(name, trust_remote_code):
    model = _load(FIXTURES / name, trust_remote_code=trust_remote_code)
    assert type(model).__module__.startswith("lmtune.model.ports.")
    ref = _reference(name)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], **TOL)


@pytest.mark.parametrize("name", PORTED)
def test_port_gives_the_original_loss_and_gradients_under_the_hub_names(name):
    model = _load(FIXTURES / name)
    ref = _reference(name)
    model.train()
    loss = model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), ref["loss"], **TOL)
    grads = {n: p.grad for n, p in model.named_parameters()}
    hub_grads = revert_weight_conversion(model, grads)  # the same renames and fusions as a save
    expected = {k.removeprefix("grad."): v for k, v in ref.items() if k.startswith("grad.")}
    assert expected
    for key, value in expected.items():
        torch.testing.assert_close(hub_grads[key], value, **TOL, msg=key)


@pytest.mark.parametrize("name", PORTED)
def test_port_gives_the_original_lora_gradients(name):
    from peft import LoraConfig, get_peft_model

    ref = _reference(name)
    target = load_file_metadata(FIXTURES / name / "reference.safetensors")["lora_target"]
    base = _load(FIXTURES / name)
    native = ports.native_target_modules(base, [target])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=native,
                                            layers_to_transform=[0]))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.copy_(ref["lora_weight.A" if "lora_A" in pname else "lora_weight.B"])
    model.train()
    loss = model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), ref["lora_loss"], **TOL)
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            torch.testing.assert_close(param.grad, ref["lora_grad.A" if "lora_A" in pname else "lora_grad.B"], **TOL)


def load_file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize("name", PORTED)
def test_hub_layout_round_trip_is_bit_identical(name, tmp_path):
    source = tmp_path / "hub"
    source.mkdir()
    for file in ("config.json", "model.safetensors"):
        (source / file).write_bytes((FIXTURES / name / file).read_bytes())
    hub = json.loads((source / "config.json").read_text())
    for file in {v.rsplit(".", 1)[0] + ".py" for v in hub["auto_map"].values()}:
        (source / file).write_text(STAND_IN_CODE)
    model = _load(source, trust_remote_code=True)
    out = tmp_path / "saved"
    model.save_pretrained(str(out))
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    saved = json.loads((out / "config.json").read_text())
    assert saved == {**hub, "torch_dtype": "float32"}  # the hub's own config.json, model_type and auto_map kept
    for file in {v.rsplit(".", 1)[0] + ".py" for v in hub["auto_map"].values()}:
        assert (out / file).read_text() == STAND_IN_CODE  # the repository's code beside it
    assert type(_load(out)).__name__ == type(model).__name__  # and lmtune loads the export again


@pytest.mark.parametrize("name", PORTED)
def test_packed_rows_keep_samples_apart_on_each_port(name):
    from lmtune.model.sft import SupervisedFinetune

    model = SupervisedFinetune(llm=_load(FIXTURES / name), use_activation_checkpointing=False)
    assert model.packing_leak() == 0.0
    torch.manual_seed(0)
    first, second = torch.randint(3, 300, (1, 7)), torch.randint(3, 300, (1, 5))
    labels = torch.cat([first, second], 1)
    labels[0, 7] = -100  # as packing does: a sample's first token is not predicted from the one before
    packed = model(input_ids=torch.cat([first, second], 1), labels=labels,
                   position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None])
    one = model(input_ids=first, labels=first, position_ids=torch.arange(7)[None])
    two = model(input_ids=second, labels=second, position_ids=torch.arange(5)[None])
    torch.testing.assert_close(packed["loss_sum"], one["loss_sum"] + two["loss_sum"], **TOL)
    assert int(packed["num_tokens"]) == int(one["num_tokens"]) + int(two["num_tokens"])


def test_configs_and_meta_models_come_from_the_port():
    hub_dir = FIXTURES / "internlm2"
    config = ports.from_pretrained(AutoConfig, str(hub_dir), trust_remote_code=True)
    assert config.model_type == "internlm2" and config.num_key_value_heads == 2
    assert config.hub_layout["config"]["model_type"] == "internlm2"
    family = ports.family_of(ports.hub_config(hub_dir))
    meta = ports.empty_model(family, ports.hub_config(hub_dir), hub_dir)
    assert all(p.is_meta for p in meta.parameters())
    assert "lmtune port of InternLM2" in ports.implementation(hub_dir, trust_remote_code=True)


# ------------------------------------------------------------------ tokenizers

TEXTS = ["What is the capital of France?", "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHi",
         "请给我介绍五个上海的景点 42 and 3.14", "  two  spaces,\ttab\n\nnewlines", "a</s>b<s> c<unk>",
         "<|action_start|><|plugin|>\n{}<|action_end|>", "emoji 🙂 and ẞ unseen characters", ""]


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_internlm2_tokenizer_equals_sentencepiece_specials_included(tmp_path, trust_remote_code):
    hub_dir = internlm2_dir(tmp_path)
    tokenizer = build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub_dir),
                           trust_remote_code=trust_remote_code, padding_side="right"))
    for text in TEXTS:
        expected = sentencepiece_ids(hub_dir / "tokenizer.model", text, INTERNLM2_SPECIALS)
        assert tokenizer(text)["input_ids"] == expected, text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 4
    assert tokenizer.decode(tokenizer("Say hello.")["input_ids"], skip_special_tokens=True) == "Say hello."


def test_internlm_v1_tokenizer_equals_sentencepiece(tmp_path):
    from hub_models import internlm_dir

    hub_dir = internlm_dir(tmp_path)
    tokenizer = build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub_dir),
                           trust_remote_code=True))
    for text in [*TEXTS, "<|User|>:Hi<eoh>\n<|Bot|>:Hello<eoa>\n"]:
        assert tokenizer(text)["input_ids"] == sentencepiece_ids(hub_dir / "tokenizer.model", text, []), text
    assert tokenizer.convert_tokens_to_ids("<eoa>") in tokenizer("x<eoa>")["input_ids"]


def test_a_ported_tokenizer_saves_as_the_repositorys_own_files(tmp_path):
    hub_dir = internlm2_dir(tmp_path)
    tokenizer = ports.from_pretrained(AutoTokenizer, str(hub_dir), trust_remote_code=True)
    out = tmp_path / "out"
    ports.save_tokenizer(tokenizer, out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenization_internlm2.py",
                 "tokenization_internlm2_fast.py"):
        assert (out / name).read_bytes() == (hub_dir / name).read_bytes(), name
    again = ports.from_pretrained(AutoTokenizer, str(out), trust_remote_code=True)
    assert again(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


# ------------------------------------------------------------------ the seed's config, and families without a port

SEED_CFG = Path(__file__).resolve().parents[1] / "lmtune" / "configs" / "internlm" / \
    "internlm2_chat_7b_qlora_oasst1_e3.py"


def test_the_seed_config_as_written_trains_qlora_packed_on_a_hub_internlm2(tmp_path):
    from conftest import OASST1_ROWS, write_jsonl

    from lmtune.config import Config
    from lmtune.engine.runner import Runner

    hub_dir = internlm2_dir(tmp_path)
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4).parent
    cfg = Config.fromfile(SEED_CFG, {"pretrained_model_name_or_path": str(hub_dir), "data_path": str(data),
                                     "max_length": 128, "accumulative_counts": 1, "save_steps": 2,
                                     "evaluation_inputs": ["Say hello."], "max_new_tokens": 3,
                                     "train_cfg.max_epochs": None, "train_cfg.max_iters": 2})
    assert cfg.model.llm.trust_remote_code is True and cfg.pack_to_max_length is True
    assert cfg.model.llm.quantization_config.load_in_4bit is True
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    base = runner.unwrapped_model.llm.get_base_model()
    assert type(base).__name__ == "InternLM2NativeForCausalLM"
    assert runner.unwrapped_model.packed_sdpa and runner.unwrapped_model.quantized
    assert "num_tokens" in runner.train_dataloader.dataset.column_names  # packed
    runner.train()
    assert (runner.work_dir / "iter_2" / "model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses and all(loss == loss for loss in losses)


def _foreign_hub_dir(root: Path, code: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "fancylm", "architectures": ["FancyForCausalLM"], "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",
                     "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}}))
    (root / "configuration_fancy.py").write_text("from transformers import PretrainedConfig\n\n\n"
                                                 "class FancyConfig(PretrainedConfig):\n    model_type = 'fancylm'\n")
    (root / "modeling_fancy.py").write_text(code)
    return root


def test_a_hub_code_family_without_a_port_stops_in_one_sentence(tmp_path):
    from lmtune.config import ConfigError

    broken = _foreign_hub_dir(tmp_path / "broken", "from transformers.modeling_attn_mask_utils import X\n")
    with pytest.raises(ConfigError) as err:
        ports.check_runnable(broken, trust_remote_code=True)
    message = str(err.value)
    assert "does not run on transformers" in message and "modeling_attn_mask_utils" in message
    assert "InternLM2" in message and "\n" not in message
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        ports.check_runnable(broken, trust_remote_code=False)
    fine = _foreign_hub_dir(tmp_path / "fine", "import torch\n\nclass FancyForCausalLM(torch.nn.Module):\n    pass\n")
    ports.check_runnable(fine, trust_remote_code=True)  # code that imports is the user's to run
    ports.check_runnable(FIXTURES / "internlm2", trust_remote_code=True)  # a port: nothing to check


# ------------------------------------------------------------------ export in the hub layout

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def _trained(tmp_path: Path, full: bool):
    from conftest import OASST1_ROWS, write_jsonl

    from lmtune.config import Config
    from lmtune.engine import checkpoint as ckpt
    from lmtune.engine.runner import Runner

    hub_dir = internlm2_dir(tmp_path)
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 4).parent
    nested = {"model.llm.quantization_config": None, "model.llm.torch_dtype": torch.float32,
              "optim_wrapper.dtype": "float32"}
    if full:
        nested["model.lora"] = None
    cfg = Config.fromfile(SEED_CFG, {"pretrained_model_name_or_path": str(hub_dir), "data_path": str(data),
                                     "max_length": 96, "max_epochs": 1, "accumulative_counts": 1, "lr": 1e-2,
                                     "save_steps": 1000, "evaluation_freq": 1000, "evaluation_inputs": ["Hi."],
                                     "max_new_tokens": 2, **nested})
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    runner.train()
    return runner, hub_dir, ckpt.find_latest(runner.work_dir)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS, use_cache=False).logits.float()


def test_a_full_run_exports_in_the_hub_layout_with_the_trained_logits(tmp_path):
    from lmtune.engine.checkpoint import export as convert

    runner, hub_dir, latest = _trained(tmp_path, full=True)
    out = convert.pth_to_hf(None, latest, tmp_path / "hf")
    hub = json.loads((hub_dir / "config.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "internlm2" and saved["auto_map"] == hub["auto_map"]
    assert {k: v for k, v in saved.items() if k != "torch_dtype"} == {k: v for k, v in hub.items()
                                                                      if k != "torch_dtype"}
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(load_file(str(hub_dir / "model.safetensors")))  # wqkv, wo, w1..w3, tok_embeddings, output
    for file in ("modeling_internlm2.py", "configuration_internlm2.py", "tokenizer.model", "tokenization_internlm2.py"):
        assert (out / file).read_bytes() == (hub_dir / file).read_bytes(), file
    reloaded = _load(out, trust_remote_code=True)
    torch.testing.assert_close(_logits(reloaded), _logits(runner.unwrapped_model.llm), **TOL)


def test_a_lora_run_exports_an_adapter_for_the_port_and_merges_in_the_hub_layout(tmp_path):
    from peft import PeftModel

    from lmtune.engine.checkpoint import export as convert
    from lmtune.tools.chat import load_for_chat

    runner, hub_dir, latest = _trained(tmp_path, full=False)
    trained = _logits(runner.unwrapped_model.llm)
    adapter = convert.pth_to_hf(None, latest, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_load(hub_dir, trust_remote_code=True), str(adapter))
    torch.testing.assert_close(_logits(peft_model), trained, **TOL)
    chat_model, tokenizer = load_for_chat(str(hub_dir), str(adapter), torch_dtype="fp32")
    torch.testing.assert_close(_logits(chat_model), trained, **TOL)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 4
    merged = convert.merge(hub_dir, adapter, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["model_type"] == "internlm2"
    assert set(load_file(str(merged / "model.safetensors"))) == set(load_file(str(hub_dir / "model.safetensors")))
    assert (merged / "modeling_internlm2.py").is_file() and (merged / "tokenizer.model").is_file()
    torch.testing.assert_close(_logits(_load(merged)), trained, **TOL)


# ------------------------------------------------------------------ the library's configs of the ported families

LIBRARY_RUNS = [("internlm2_chat_7b_qlora_alpaca_e3", "internlm2"), ("internlm2_5_chat_7b_lora_oasst1_e3", "internlm2"),
                ("internlm2_chat_1_8b_full_custom_e3", "internlm2"),
                ("internlm3_8b_instruct_lora_alpaca_e3", "internlm3")]


@pytest.mark.parametrize("name,fixture", LIBRARY_RUNS)
def test_library_configs_of_ported_families_train_packed_without_remote_code(name, fixture, tmp_path):
    from hub_models import internlm3_dir, train_library_config

    hub = internlm2_dir(tmp_path) if fixture == "internlm2" else internlm3_dir(tmp_path)
    runner = train_library_config(name, hub, tmp_path)
    assert type(runner.unwrapped_model._base_model()).__module__ == "lmtune.model.ports.internlm"
