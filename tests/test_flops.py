"""The FLOP counter against numbers worked out by hand for tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.core.constants import IGNORE_INDEX as X
from lmtune.engine.flops import AttentionLayer, FlopCounter, MatmulParams, count_targets, sample_lengths

# The tiny Llama: hidden 64, 4 heads of 16 (2 key/value heads), MLP 128, 2 layers, vocab 100.
# Matmul weights of one layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate, up, down 3 * 64*128
#   = 4096 + 2048 + 2048 + 4096 + 3 * 8192 = 36864; two layers: 73728. Head: 64 * 100 = 6400.
BODY, HEAD = 73_728, 6_400
# Attention reads 4 query heads x 16 = 64 wide scores and 64 wide values: 2 * (64 + 64) = 256 FLOPs per
# query/key pair and layer.


def tiny_llama(**extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return LlamaForCausalLM(config)


def batch() -> dict:
    """Row 0 packs samples of 5 and 3 tokens, then 2 of padding; row 1 is one sample of 10 tokens."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 0, 0], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    labels = torch.tensor([[X, X, 7, 8, 9, X, 11, 12, X, X], [X, X, X, X, 24, 25, 26, 27, 28, 29]])
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1], list(range(10))])
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids)


# samples of 5, 3 and 10 tokens: 18 tokens; causal pairs 15 + 6 + 55 = 76; targets (labels shifted by one):
# row 0 positions 2, 3, 4, 6, 7 and row 1 positions 4..9: 11.
TOKENS, PAIRS, TARGETS = 18, 76, 11
FORWARD = 2 * BODY * TOKENS + 2 * HEAD * TARGETS + 2 * 256 * PAIRS  # 2,654,208 + 140,800 + 38,912
assert FORWARD == 2_833_920


def test_batch_reading():
    assert sample_lengths(batch()) == [5, 3, 10]
    assert count_targets(batch()) == TARGETS
    no_positions = {k: v for k, v in batch().items() if k != "position_ids"}
    assert sample_lengths(no_positions) == [8, 10]  # one sample per row, trailing padding dropped
    masked = dict(batch(), attention_mask=torch.tensor([[1] * 8 + [0, 0], [1] * 10]))
    assert sample_lengths(masked) == [5, 3, 10]


def test_attention_pairs():
    assert AttentionLayer(64, 64).pairs(10) == 55
    assert AttentionLayer(64, 64, causal=False).pairs(10) == 100
    assert AttentionLayer(64, 64, window=4).pairs(10) == 1 + 2 + 3 + 4 + 6 * 4
    assert AttentionLayer(64, 64, window=40).pairs(10) == 55


def test_full_finetuning_is_three_forward_passes():
    counter = FlopCounter(tiny_llama())
    assert (counter.body.total, counter.body.trainable, counter.head.total) == (BODY, BODY, HEAD)
    assert [(a.width_qk, a.width_v, a.causal) for a in counter.attention] == [(64, 64, True)] * 2
    assert counter.forward_flops([5, 3, 10], TARGETS) == FORWARD
    assert counter.batch_flops(batch()) == 3 * FORWARD == 8_501_760
    # without a target count the head runs on every token
    assert counter.forward_flops([5, 3, 10]) == FORWARD + 2 * HEAD * (TOKENS - TARGETS)


def test_full_attention_and_forced_causality():
    counter = FlopCounter(tiny_llama(), causal=False)
    assert counter.forward_flops([5, 3, 10], TARGETS) == FORWARD - 2 * 256 * 76 + 2 * 256 * (25 + 9 + 100)


def test_activation_checkpointing_recomputes_the_layers_not_the_head():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counter = FlopCounter(model)
    assert counter.body.recomputed == BODY and counter.head.recomputed == 0
    assert all(a.recomputed for a in counter.attention)
    recompute = 2 * BODY * TOKENS + 2 * 256 * PAIRS  # 2,654,208 + 38,912
    assert counter.batch_flops(batch()) == 3 * FORWARD + recompute == 11_194_880
    assert FlopCounter(model, activation_checkpointing=False).batch_flops(batch()) == 3 * FORWARD
    assert FlopCounter(tiny_llama(), activation_checkpointing=True).batch_flops(batch()) == 11_194_880


def test_lora_frozen_weights_skip_their_weight_gradient():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    counter = FlopCounter(model)
    # adapters per layer: q 64*8 + 8*64 = 1024, v 64*8 + 8*32 = 768; two layers: 3584, all trainable
    assert (counter.body.trainable, counter.body.frozen) == (3_584, BODY)
    assert (counter.head.trainable, counter.head.frozen) == (0, HEAD)
    forward = 2 * (BODY + 3_584) * TOKENS + 2 * HEAD * TARGETS + 2 * 256 * PAIRS
    assert forward == 2_962_944 and counter.forward_flops([5, 3, 10], TARGETS) == forward
    backward = ((2 * (BODY + 3_584) + 2 * 3_584) * TOKENS  # input gradients everywhere, weight gradients of adapters
                + 2 * HEAD * TARGETS  # the frozen head: input gradient only
                + 2 * 2 * 256 * PAIRS)  # attention: twice its forward
    assert backward == 3_130_880
    assert counter.batch_flops(batch()) == forward + backward == 6_093_824


def test_peft_head_wrappers_count_the_active_copy():
    from peft import LoraConfig, get_peft_model

    saved = FlopCounter(get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"])))
    assert (saved.head.total, saved.head.trainable) == (HEAD, HEAD)  # the trained copy, not also the original
    on_head = FlopCounter(get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["lm_head"])))
    assert (on_head.head.total, on_head.head.trainable) == (HEAD + 64 * 8 + 8 * 100, 64 * 8 + 8 * 100)


def test_supervised_finetune_and_quantized_layers_use_their_logical_size():
    from lmtune.model.sft import SupervisedFinetune

    model = SupervisedFinetune(tiny_llama(), use_activation_checkpointing=True, loss_chunk_size=0)
    counter = FlopCounter(model)
    # two equal layers; activation checkpointing recomputes the first only (the last one's backward follows at once)
    assert (counter.body.total, counter.head.total, counter.body.recomputed) == (BODY, HEAD, BODY // 2)
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 128, bias=False).to("cpu")  # quantized: its weight is packed bytes
    assert layer.weight.numel() != 64 * 128
    assert FlopCounter(torch.nn.Sequential(layer)).body == MatmulParams(trainable=0, frozen=64 * 128)


def test_mixture_of_experts_counts_the_experts_a_token_uses():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2))
    counter = FlopCounter(model)
    # attention 12288, router 4*64 = 256, experts (gate_up 256*64 + down 64*128 per expert) * 2 of them
    assert counter.body.total == 12_288 + 256 + 2 * (256 * 64 + 64 * 128)
    assert counter.head.total == HEAD and len(counter.attention) == 1
