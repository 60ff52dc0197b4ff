"""DeepSeek-MoE (v1) on lmtune's port: what tests/test_ports.py's generic fixture tests do not cover.

- the tokenizer: the ids of the hub's ``LlamaTokenizerFast`` (its tokenizer.json's pipeline, BOS from
  ``add_bos_token``), which transformers 5 alone does not give (it adds no BOS);
- the chat format: lmtune's chat-template mode equals the hub's chat template, ids and trained spans;
  ``PROMPT_TEMPLATE.deepseek_moe`` renders the same text but tokenizes the answer apart from ``"Assistant: "``;
- the balance loss in lmtune's ``SupervisedFinetune``: the gradient of its token-mean loss is the hub code's
  (cross-entropy plus the balance loss's gradient), its loss value the cross-entropy alone;
- which LoRA targets reach what (dense and shared-expert MLPs are linear layers, routed experts fused);
- an XTuner-style deepseek_moe_16b_chat QLoRA config (trust_remote_code, ``PROMPT_TEMPLATE.deepseek_moe``,
  packed) trains on a hub-layout tiny repository without running its code.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hub_models import FIXTURES
from hub_models_deepseek import BOS, EOS, deepseek_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config.build import build
from lmtune.configs import config_text
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset.encode import ConversationEncoder
from lmtune.dataset.map_fns import template_map_fn_factory
from lmtune.model import ports

TEXTS = ["What is the capital of France?", "请给我介绍五个上海的景点 42 and 3.14", "  two  spaces,\ttab\n\nnewlines  ",
         f"a{EOS}b{BOS} c", "emoji 🙂 and ẞ unseen characters", "User: Hi\n\nAssistant: Hello!", ""]
CONVERSATION = [{"system": "Be brief.", "input": "Hi", "output": "Hello!"},
                {"input": "Who are you?", "output": "An assistant."}]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "An assistant."}]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    return deepseek_dir(tmp_path_factory.mktemp("deepseek"))


def _tokenizer(path: Path, **kwargs):
    return build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(path), **kwargs))


def _original_ids(tokenizer_json: Path, text: str, add_bos: bool) -> list[int]:
    """What the hub's LlamaTokenizerFast (transformers 4) gives: the tokenizer.json's own pipeline, its post-processor
    replaced by BOS + text when ``add_bos_token`` (``LlamaTokenizerFast.update_post_processor``)."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0" if add_bos else "$A:0", special_tokens=[(BOS, bos_id)])
    return tokenizer.encode(text).ids


# ------------------------------------------------------------------ tokenizer

@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_tokenizer_ids_are_the_hub_tokenizers(hub_dir, trust_remote_code):
    tokenizer = _tokenizer(hub_dir, trust_remote_code=trust_remote_code, padding_side="right")
    assert type(tokenizer).__name__ == "TokenizersBackend"
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _original_ids(hub_dir / "tokenizer.json", text, True), text
    assert (tokenizer.bos_token, tokenizer.eos_token) == (BOS, EOS)
    ids = tokenizer(TEXTS[4])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[4]


def test_tokenizer_follows_add_bos_token_false(tmp_path):
    hub = deepseek_dir(tmp_path, add_bos_token=False)
    tokenizer = _tokenizer(hub)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _original_ids(hub / "tokenizer.json", text, False), text


def test_transformers_alone_would_drop_the_bos(hub_dir):
    """Why the port has its own tokenizer loader: transformers 5 reads this LlamaTokenizerFast repository with
    the tokenizer.json's byte-level post-processor, adding no BOS (the original adds one)."""
    plain = AutoTokenizer.from_pretrained(str(hub_dir))
    assert plain("Hi")["input_ids"][0] != plain.convert_tokens_to_ids(BOS)
    assert _tokenizer(hub_dir)("Hi")["input_ids"][0] == plain.convert_tokens_to_ids(BOS)


# ------------------------------------------------------------------ chat format

def _row(tokenizer, template) -> dict:
    example = template_map_fn_factory(template)({"conversation": copy.deepcopy(CONVERSATION)})
    return ConversationEncoder(tokenizer, max_length=None)(example)


def _trained(tokenizer, row) -> list[str]:
    runs, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("template", [None, "auto"])
def test_chat_template_mode_equals_the_hub_chat_template(hub_dir, template):
    tokenizer = _tokenizer(hub_dir)
    row = _row(tokenizer, template)
    assert row["input_ids"] == list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert [t.strip() for t in _trained(tokenizer, row)] == ["Hello!" + EOS, "An assistant." + EOS]


def test_deepseek_moe_template_renders_the_hub_text_but_splits_the_answers_space(hub_dir):
    """``PROMPT_TEMPLATE.deepseek_moe`` writes the hub format's text, but ends the prompt with ``"Assistant: "``
    and encodes the answer on its own: the space is a token of its own instead of the answer's first token's
    (DeepSeek's byte-level pre-tokenizer attaches one leading space to a word). The ids then differ from the hub
    chat template's at the start of every answer; the chat-template mode (above) has the hub's ids."""
    tokenizer = _tokenizer(hub_dir)
    row = _row(tokenizer, "deepseek_moe")
    hub = list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
    assert tokenizer.decode(row["input_ids"]) == tokenizer.decode(hub)  # the same text
    assert _trained(tokenizer, row) == ["Hello!" + EOS, "An assistant." + EOS]
    space = tokenizer.convert_tokens_to_ids("Ġ")
    answer_starts = [i for i in range(1, len(row["labels"])) if row["labels"][i] != IGNORE_INDEX
                     and row["labels"][i - 1] == IGNORE_INDEX]
    assert all(row["input_ids"][i - 1] == space for i in answer_starts)
    assert row["input_ids"] != hub


# ------------------------------------------------------------------ the balance loss in SupervisedFinetune

def _model(fixture: str, **overrides):
    return ports.from_pretrained(AutoModelForCausalLM, str(FIXTURES / fixture), dtype=torch.float32, **overrides)


@pytest.mark.parametrize("fixture", ["deepseek_moe", "deepseek_moe_norm_tokaux"])
def test_supervised_finetune_trains_with_the_hub_codes_balance_gradient(fixture):
    from lmtune.model.sft import SupervisedFinetune

    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64, 11, 200], [1, 300, 12, 77, 190, 45, 6, 2, 140, 260]])

    def grads(llm, use_sft: bool, checkpointing: bool = False):
        llm.train()
        if use_sft:
            sft = SupervisedFinetune(llm=llm, use_activation_checkpointing=checkpointing)
            out = sft(input_ids=ids, labels=ids)
        else:
            out = {"loss": llm(input_ids=ids, labels=ids).loss}
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in llm.named_parameters()}

    sft_loss, sft = grads(_model(fixture), True)
    hf_loss, hf = grads(_model(fixture), False)  # the model's own loss: the fixtures hold it equal to the hub code's
    plain_loss, plain = grads(_model(fixture, aux_loss_alpha=0.0), True)
    _, checkpointed = grads(_model(fixture), True, checkpointing=True)  # recomputed layers: the same gradients
    torch.testing.assert_close(sft_loss, hf_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sft_loss, plain_loss, atol=1e-6, rtol=1e-6)  # the loss value: cross-entropy alone
    for name in sft:
        torch.testing.assert_close(sft[name], hf[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(checkpointed[name], sft[name], atol=1e-6, rtol=1e-5, msg=name)
    routers = [n for n in sft if n.endswith("mlp.gate.weight")]
    assert routers and all((sft[n] - plain[n]).abs().max() > 1e-3 for n in routers)
    assert (sft["model.embed_tokens.weight"] - plain["model.embed_tokens.weight"]).abs().max() > 1e-4  # upstream


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
def test_every_experts_implementation_gives_the_original_logits_and_gradients(experts):
    from safetensors.torch import load_file
    from transformers.core_model_loading import revert_weight_conversion

    ref = load_file(str(FIXTURES / "deepseek_moe" / "reference.safetensors"))
    model = _model("deepseek_moe", experts_implementation=experts)
    assert model.config._experts_implementation == experts
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], atol=1e-5, rtol=1e-5)
    model.train()
    model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss.backward()
    hub = revert_weight_conversion(model, {n: p.grad for n, p in model.named_parameters()})
    for key in (k for k in ref if k.startswith("grad.")):
        torch.testing.assert_close(hub[key[5:]], ref[key], atol=1e-5, rtol=1e-5, msg=key)


def test_eval_mode_and_zero_alpha_leave_no_balance_term():
    from lmtune.model.ports.deepseek import DeepseekMoeRouter

    model = _model("deepseek_moe")
    router = next(m for m in model.modules() if isinstance(m, DeepseekMoeRouter))
    hidden = torch.randn(2, 5, model.config.hidden_size)
    router.train()
    assert router(hidden)[2] is not None
    router.eval()
    assert router(hidden)[2] is None
    model = _model("deepseek_moe", aux_loss_alpha=0)
    assert next(m for m in model.modules() if isinstance(m, DeepseekMoeRouter)).alpha == 0.0


# ------------------------------------------------------------------ structure, LoRA, configs

def test_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    from lmtune.model.ports.deepseek import DeepseekMoeBlock

    kinds = lambda m: [type(layer.mlp).__name__ for layer in m.model.layers]  # noqa: E731
    assert kinds(_model("deepseek_moe")) == ["LlamaMLP", "DeepseekMoeBlock"]
    three = _model("deepseek_moe_norm_tokaux")
    assert kinds(three) == ["DeepseekMoeBlock", "LlamaMLP", "DeepseekMoeBlock"]
    assert all(m.shared_experts is None for m in three.modules() if isinstance(m, DeepseekMoeBlock))
    experts = _model("deepseek_moe").model.layers[1].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 64, 64) and tuple(experts.down_proj.shape) == (8, 64, 32)


def test_a_model_made_from_its_config_initialises_the_router_and_experts():
    from lmtune.model.ports.deepseek import DeepseekMoeNativeForCausalLM, native_config

    hub = json.loads((FIXTURES / "deepseek_moe" / "config.json").read_text())
    torch.manual_seed(0)
    model = DeepseekMoeNativeForCausalLM(native_config(hub))
    mlp = model.model.layers[1].mlp
    for weight in (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.shared_experts.up_proj.weight):
        assert torch.isfinite(weight).all() and abs(float(weight.detach().std()) - 0.02) < 0.003


def test_lora_targets_reach_the_linear_layers_and_fused_experts_take_target_parameters():
    from peft import LoraConfig, get_peft_model

    from lmtune.model.build import find_all_linear_names, has_fused_experts

    model = _model("deepseek_moe")
    assert has_fused_experts(model)
    assert find_all_linear_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                            "v_proj"]  # the router (mlp.gate) is no linear layer, as in the hub code
    assert ports.native_target_modules(model, ["q_proj", "gate_proj"]) == ["q_proj", "gate_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["gate_proj", "up_proj", "down_proj"]))
    adapted = {re.sub(r"\.lora_[AB].*", "", n) for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert adapted == {f"base_model.model.model.layers.{p}.{k}" for p in ("0.mlp", "1.mlp.shared_experts")
                       for k in ("gate_proj", "up_proj", "down_proj")}
    model = _model("deepseek_moe")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[],
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    peft_model.train()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all("mlp.experts" in n for n, _ in lora)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora if "lora_B" in n)


def test_native_config_keeps_the_hub_defaults_and_refuses_what_it_cannot_run():
    from lmtune.model.ports.deepseek import native_config

    hub = json.loads((FIXTURES / "deepseek_moe" / "config.json").read_text())
    config = native_config({k: v for k, v in hub.items() if k not in ("norm_topk_prob", "seq_aux", "aux_loss_alpha")})
    assert (config.norm_topk_prob, config.seq_aux, config.aux_loss_alpha) == (False, True, 0.001)
    dense = native_config({k: v for k, v in hub.items() if k != "n_routed_experts"})
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    with pytest.raises(ConfigError, match="scoring_func"):
        native_config({**hub, "scoring_func": "sigmoid"})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        native_config({**hub, "num_experts_per_tok": None})


# ------------------------------------------------------------------ an XTuner-style config, packed

LIBRARY_QLORA = "deepseek_v2_lite_chat_qlora_oasst1_e3"  # rendered by the library


def _xtuner_style_config(path: Path) -> Path:
    """XTuner's deepseek_moe_16b_chat_qlora_oasst1_e3 in lmtune's terms: the library's DeepSeek QLoRA oasst1
    config with XTuner's model, template, trust_remote_code and LoRA (r=16, alpha 16, dropout 0.05, every linear
    layer)."""
    text = config_text(LIBRARY_QLORA)
    text = text.replace('"deepseek-ai/DeepSeek-V2-Lite-Chat"', '"deepseek-ai/deepseek-moe-16b-chat"')
    text = text.replace("PROMPT_TEMPLATE.deepseek_v2", "PROMPT_TEMPLATE.deepseek_moe")
    text = text.replace("pretrained_model_name_or_path=pretrained_model_name_or_path,",
                        "pretrained_model_name_or_path=pretrained_model_name_or_path,\n        trust_remote_code=True,")
    text, lora = re.subn(r"lora=dict\(.*?task_type=\"CAUSAL_LM\"\)",
                         'lora=dict(type=LoraConfig, r=16, lora_alpha=16, lora_dropout=0.05, bias="none", '
                         'task_type="CAUSAL_LM")', text, flags=re.S)
    assert lora == 1 and "deepseek-moe-16b-chat" in text and text.count("trust_remote_code=True") == 2
    path.write_text(text, encoding="utf-8")
    return path


def test_an_xtuner_style_deepseek_moe_qlora_config_trains_packed_without_remote_code(hub_dir, tmp_path):
    from conftest import OASST1_ROWS, write_jsonl

    from lmtune.config import Config
    from lmtune.engine.runner import Runner

    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": t} for t in OASST1_ROWS] * 3).parent
    cfg = Config.fromfile(_xtuner_style_config(tmp_path / "deepseek_moe_16b_chat_qlora_oasst1_e3.py"), {
        "pretrained_model_name_or_path": str(hub_dir), "data_path": str(data), "max_length": 96, "max_epochs": 1,
        "accumulative_counts": 1, "save_steps": 1000, "evaluation_inputs": ["Hi."], "max_new_tokens": 2,
        "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32",
        "model.llm.quantization_config.bnb_4bit_compute_dtype": torch.float32})
    assert cfg.pack_to_max_length is True and cfg.model.llm.trust_remote_code is True
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    model = runner.unwrapped_model
    base = model._base_model()
    assert type(base).__name__ == "DeepseekMoeNativeForCausalLM" and model.quantized
    assert type(base.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"  # the dense layer, quantized
    assert model.llm.peft_config["default"].lora_dropout == 0.0  # fused experts: peft needs dropout 0
    assert "num_tokens" in runner.train_dataloader.dataset.column_names  # packed
    runner.train()
    losses = [json.loads(line)["loss"] for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)
