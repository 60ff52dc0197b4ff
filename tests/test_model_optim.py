"""SupervisedFinetune and the optimizer wrappers on their own."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.config import ConfigError, build
from lmtune.core import device as device_mod
from lmtune.engine.optim import AmpOptimWrapper, OptimWrapper
from lmtune.model import SupervisedFinetune
from lmtune.model.build import find_all_linear_names


def llm_cfg(model_dir):
    return dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=model_dir,
                dtype=torch.float32)


def batch():
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(8)[None]}


def test_lora_targets_every_linear_layer_but_the_head(tiny_model_dir):
    from peft import LoraConfig

    model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), lora=dict(type=LoraConfig, r=4, lora_alpha=8))
    targets = set(model.llm.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = model.llm.get_base_model()
    assert "lm_head" not in find_all_linear_names(base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(model.trainable_state_dict()) == set(trainable)


def test_activation_checkpointing_recomputes_every_decoder_layer_but_the_last(tiny_model_dir):
    from peft import LoraConfig

    model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), use_activation_checkpointing=True,
                               lora=dict(type=LoraConfig, r=4, lora_alpha=8)).train()
    layers = list(model.llm.get_base_model().model.layers)
    assert len(layers) >= 2
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # a pre-hook: the recompute stops early, once it has what backward needs
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(**batch())["loss"].backward()
    assert calls == [2] * (len(layers) - 1) + [1]  # forward and recompute; the last layer's forward only


def test_activation_checkpointing_with_lora_gives_the_same_loss_and_gradients(tiny_model_dir):
    from peft import LoraConfig

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), use_activation_checkpointing=checkpointing,
                                   lora=dict(type=LoraConfig, r=4, lora_alpha=8, init_lora_weights=False))
        model.train()
        out = model(**batch())
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        results.append((out["loss"].detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_is_sum_over_target_tokens(tiny_model_dir):
    model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), use_activation_checkpointing=False).eval()
    data = batch()
    with torch.no_grad():
        out = model(**data)
        logits = model.llm(input_ids=data["input_ids"]).logits[0, :-1]
    targets = data["labels"][0, 1:]
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    assert int(out["num_tokens"]) == 5
    torch.testing.assert_close(out["loss_sum"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], expected / 5)


def test_full_finetuning_keeps_fp32_master_weights(tiny_model_dir):
    cfg = dict(llm_cfg(tiny_model_dir), dtype=torch.bfloat16)
    model = SupervisedFinetune(llm=cfg, use_activation_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp16_on_cpu_falls_back_to_bf16_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(device_mod, "_warned", set())
    params = [torch.nn.Parameter(torch.ones(2))]
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        first = AmpOptimWrapper(torch.optim.SGD(params, lr=0.1), dtype="float16")
        second = AmpOptimWrapper(torch.optim.SGD(params, lr=0.1), dtype="float16")
    assert first.dtype == second.dtype == torch.bfloat16 and first.scaler is None
    assert sum("float16 is not a training dtype" in r.message for r in caplog.records) == 1
    with first.optim_context():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_optim_wrapper_clips_and_reports_the_norm():
    param = torch.nn.Parameter(torch.zeros(4))
    wrapper = OptimWrapper(torch.optim.SGD([param], lr=1.0), clip_grad=dict(max_norm=1.0))
    (param * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()
    norm = wrapper.step()
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(param.detach(), -torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert param.grad is None


def test_a_bad_value_is_a_config_error_naming_the_key():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ConfigError, match=r"optim_wrapper\.optimizer.*Invalid learning rate"):
        build(dict(type=torch.optim.AdamW, lr=-1.0), key="optim_wrapper.optimizer", params=params)


def test_qlora_gradients_survive_an_evaluation_pass(tiny_model_dir):
    """Generating in eval mode (the evaluate-chat hook) must not change the gradients of the next step."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quant = dict(type=BitsAndBytesConfig, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    torch.manual_seed(0)
    model = SupervisedFinetune(llm=dict(llm_cfg(tiny_model_dir), quantization_config=quant),
                               lora=dict(type=LoraConfig, r=4, lora_alpha=8, init_lora_weights=False),
                               use_activation_checkpointing=False)

    def grads():
        model.train()
        model.zero_grad()
        model(**batch())["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model.llm.generate(input_ids=batch()["input_ids"], max_new_tokens=2, do_sample=False)
    after = grads()
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


def make_leaky(model, monkeypatch) -> None:
    """An implementation that takes the restarting position ids but masks only causally over the whole row."""
    original = model.llm.forward

    def leaky_forward(input_ids=None, position_ids=None, **kwargs):
        return original(input_ids=input_ids, position_ids=position_ids,
                        attention_mask=torch.ones_like(input_ids), **kwargs)

    monkeypatch.setattr(model.llm, "forward", leaky_forward)


def test_packing_isolation_probe_tells_isolating_from_leaking_attention(tiny_model_dir, monkeypatch):
    model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), use_activation_checkpointing=False)
    assert model.packing_leak() < 1e-4
    make_leaky(model, monkeypatch)
    assert model.packing_leak() > 0.05


def test_packing_probe_is_not_fooled_by_bf16_rounding(tiny_model_dir, monkeypatch):
    # in bf16 the packed and the lone sample differ by rounding alone (a few % of a random model's small
    # logits); the probe subtracts that noise, and still catches attention that leaks across samples
    model = SupervisedFinetune(llm={**llm_cfg(tiny_model_dir), "dtype": torch.bfloat16},
                               use_activation_checkpointing=False)
    assert model.packing_leak() < 0.02
    make_leaky(model, monkeypatch)
    assert model.packing_leak() > 0.05


def test_lora_under_autocast_skips_peft_input_cast(tiny_model_dir, monkeypatch):
    # bf16 frozen weights, fp32 adapters, bf16 autocast: peft's cast of each adapter input to fp32 is
    # undone by autocast at once, so lmtune turns it off then (and on again without autocast)
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from lmtune.model import lora_speed

    def make():
        torch.manual_seed(0)
        lora = dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False)
        return SupervisedFinetune(llm={**llm_cfg(tiny_model_dir), "dtype": torch.bfloat16}, lora=lora,
                                  use_activation_checkpointing=True).train()

    model = make()
    with monkeypatch.context() as patch:  # peft's own behaviour, for reference
        patch.setattr(lora_speed, "speed_up_lora_layers", lambda model: None)
        reference = make()
    seen = []
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        layer.register_forward_hook(lambda module, args, out: seen.append(module.cast_input_dtype_enabled))

    def step(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch())["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    (loss, grads), (ref_loss, ref_grads) = step(model), step(reference)
    assert seen and not any(seen)  # off in the forward and in the recomputation
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-2)  # bf16: the fused sum rounds once, not twice
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        assert float((grads[name].float() - grad.float()).norm() / grad.float().norm()) < 0.05, name
    # without autocast the cast is back on: bf16 activations meet the fp32 adapters without a dtype error
    seen.clear()
    model.eval()
    with torch.no_grad():
        model.llm.generate(input_ids=batch()["input_ids"], max_new_tokens=2, do_sample=False)
    assert seen and all(seen)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_lora_linear_equals_peft_forward_and_gradients(tiny_model_dir, dora, monkeypatch):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from lmtune.model.lora_speed import FusedLoraLinear

    torch.manual_seed(0)
    lora = dict(type=LoraConfig, r=8, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, use_dora=dora)
    model = SupervisedFinetune(llm=llm_cfg(tiny_model_dir), lora=lora, use_activation_checkpointing=False).train()
    layers = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)

    def step():
        model.zero_grad()
        out = model(**batch())
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    peft_calls = []
    original = PeftLinear.forward
    with monkeypatch.context() as patch:
        patch.setattr(PeftLinear, "forward", lambda self, *a, **k: peft_calls.append(1) or original(self, *a, **k))
        fused_loss, fused_grads = step()
    assert bool(peft_calls) == dora  # plain LoRA takes the fused path; DoRA falls back to peft's forward
    peft_calls.clear()
    with monkeypatch.context() as patch:  # inside torch.compile, always peft's forward (inductor fuses it)
        patch.setattr(PeftLinear, "forward", lambda self, *a, **k: peft_calls.append(1) or original(self, *a, **k))
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled_loss, _ = step()
    assert len(peft_calls) == len(layers) and float(compiled_loss) == pytest.approx(float(fused_loss), rel=1e-6)
    for m in layers:
        m.__class__ = PeftLinear  # peft's own forward
    peft_loss, peft_grads = step()
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-6, atol=0)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
