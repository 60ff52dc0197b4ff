"""Packed rows without flash-attn: per-sample causal SDPA equals transformers' masked SDPA."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.model import SupervisedFinetune
from lmtune.model.packed_attention import PACKED_SDPA, SEGMENTS_KWARG, segment_bounds, use_packed_sdpa


def test_segment_bounds_follow_position_restarts_and_rows():
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1]])) == [0, 3, 5]
    # each row starts a sample, even when its positions run on from the previous row's last
    assert segment_bounds(torch.tensor([[0, 1, 2, 0], [1, 2, 0, 1]])) == [0, 3, 4, 6, 8]
    assert segment_bounds(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])) is None  # no packing: nothing to do


def tiny_llama(seed=0, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa", **extra)
    return LlamaForCausalLM(config).float()


def packed_batch():
    # two rows: one of three samples, one of two samples and right padding (positions restart there too)
    rows = [{"input_ids": list(range(3, 30)), "labels": list(range(3, 30)), "num_tokens": [9, 7, 11]},
            {"input_ids": list(range(40, 60)), "labels": list(range(40, 60)), "num_tokens": [12, 8]}]
    return default_collate_fn(rows, pad_index=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_sample_sdpa_equals_masked_sdpa_in_outputs_and_gradients(checkpointing):
    reference, packed = tiny_llama(), tiny_llama()
    assert use_packed_sdpa(packed) and packed.config._attn_implementation == PACKED_SDPA
    for model in (reference, packed):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = packed_batch()
    bounds = segment_bounds(batch["position_ids"])
    assert bounds == [0, 9, 16, 27, 27 + 12, 27 + 20, 54]

    results = []
    for model, extra in ((reference, {}), (packed, {SEGMENTS_KWARG: bounds})):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **extra).logits
        (logits.float() ** 2).mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (out_logits, out_grads) = results
    torch.testing.assert_close(out_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(out_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # the check has teeth: the boundaries matter (one segment per row lets the samples see each other)
    wrong = packed(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   **{SEGMENTS_KWARG: [0, 27, 54]}).logits
    assert (wrong - ref_logits).abs().max() > 1e-3


def test_calls_without_boundaries_generation_included_are_plain_sdpa():
    reference, packed = tiny_llama(), tiny_llama()
    use_packed_sdpa(packed)
    ids = torch.tensor([[5, 8, 13, 21, 34]])
    torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert packed.generate(ids, **kwargs).tolist() == reference.generate(ids, **kwargs).tolist()


def test_models_with_sliding_windows_keep_transformers_sdpa():
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16, attn_implementation="sdpa"))
    assert not use_packed_sdpa(mistral) and mistral.config._attn_implementation == "sdpa"
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not use_packed_sdpa(eager)


def test_supervised_finetune_trains_packed_rows_per_sample_and_exports_plain_configs(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    llm = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=tiny_model_dir,
               dtype=torch.float32)
    model = SupervisedFinetune(llm=llm, use_activation_checkpointing=True).train()
    assert model.packed_sdpa
    batch = packed_batch()
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append((q.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask") is None))
        return original(q, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        model(**batch)["loss"].backward()
    layers = model.llm.config.num_hidden_layers
    # forward, then the recomputation of each layer but the last in the backward pass: one causal call per sample
    assert sorted(calls) == sorted([(n, True, True) for n in (9, 7, 11, 12, 8, 7)] * (layers * 2 - 1))

    reference = SupervisedFinetune(llm=llm, use_activation_checkpointing=True).train()
    reference.packed_sdpa = False
    reference.llm.set_attn_implementation("sdpa")
    assert float(model(**batch)["loss"]) == pytest.approx(float(reference(**batch)["loss"]), rel=1e-6)

    model.llm.save_pretrained(tmp_path / "export")
    assert PACKED_SDPA not in json.dumps(json.loads((tmp_path / "export" / "config.json").read_text()))


def test_torch_compile_compiles_each_decoder_layer_and_keeps_the_loss(tiny_model_dir):
    from lmtune.config import ConfigError
    from lmtune.model.compile import decoder_layers

    llm = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=tiny_model_dir,
               dtype=torch.float32)
    reference = SupervisedFinetune(llm=llm, use_activation_checkpointing=True).train()
    # the "eager" backend runs dynamo's tracing and graph breaks without the C++ build of inductor
    model = SupervisedFinetune(llm=llm, use_activation_checkpointing=True,
                               torch_compile=dict(backend="eager")).train()
    layers = decoder_layers(model._base_model())
    assert model.compiled_layers == len(layers) == model.llm.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert reference.compiled_layers == 0

    batch = packed_batch()
    for rows in (batch, {k: v[:1, :16] for k, v in batch.items()}):  # other boundaries: no recompiling error
        losses, grads = [], []
        for m in (reference, model):
            m.zero_grad()
            out = m(**rows)
            out["loss"].backward()
            losses.append(float(out["loss"]))
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)

    for bad in ("yes", dict(bogus=1)):
        with pytest.raises(ConfigError, match="torch_compile"):
            SupervisedFinetune(llm=llm, torch_compile=bad)
