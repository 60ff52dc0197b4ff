"""Sequence parallelism (issue 18) on gloo ranks: the Ulysses exchange of attention heads and sequence slices gives
the attention output and the gradients of one process, in fp64, for grouped-query heads, heads that do not divide
by the ranks, packed rows (each sample attending only to itself) and a value width other than the key width; the
process groups and the data each rank reads; and a model's row split over two ranks gives the loss and gradients
of one process (full fine-tuning with and without activation checkpointing, QLoRA, FSDP2). The end-to-end runs
(DDP, ZeRO-3, resume) are in test_distributed.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtune.model.ulysses import kv_repeats

CASES = [  # (heads, kv heads, dim of q/k, dim of v)
    (4, 2, 8, 8),   # GQA, heads divide
    (4, 1, 8, 6),   # one key/value head (MQA), another value width
    (3, 3, 8, 8),   # heads that do not divide by 2 ranks: padded
    (6, 3, 4, 4),   # 3 kv heads: repeated as far as 2 ranks need
]
LENGTH = 12  # a packed row of samples of 5, 4 and 3 tokens, split 6 + 6 over the ranks
SEGMENTS = [5, 4, 3]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each sample of the row (the whole row's bounds), grouped-query heads repeated."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    sample = torch.repeat_interleave(torch.arange(len(SEGMENTS)), torch.tensor(SEGMENTS))
    allowed = (sample[:, None] == sample[None, :]) & torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def inputs(case: tuple) -> tuple[torch.Tensor, ...]:
    heads, kv, dim, dim_v = case
    gen = torch.Generator().manual_seed(sum(case))
    make = lambda h, d: torch.randn(2, h, LENGTH, d, dtype=torch.float64, generator=gen)  # noqa: E731
    return make(heads, dim), make(kv, dim), make(kv, dim_v), make(heads, dim_v)  # q, k, v, upstream grad


def _on_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from lmtune.model.ulysses import ulysses_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = dist.new_group([0, 1])
        results = []
        for case in CASES:
            q, k, v, grad = inputs(case)
            local = slice(rank * LENGTH // 2, (rank + 1) * LENGTH // 2)
            q, k, v = (t[:, :, local].clone().requires_grad_() for t in (q, k, v))
            out = ulysses_attention(q, k, v, group, attend)
            out.backward(grad[:, :, local])
            results.append({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_exchange_on_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for n, case in enumerate(CASES):
        q, k, v, grad = inputs(case)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = attend(q, k, v)
        out.backward(grad)
        joined = {name: torch.cat([ranks[0][n][name], ranks[1][n][name]], dim=2) for name in ranks[0][n]}
        for name, expected in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(joined[name], expected.detach(), rtol=0, atol=1e-12, msg=f"{case} {name}")


@pytest.mark.parametrize(("heads", "kv", "size", "repeat"), [
    (32, 8, 4, 1), (32, 8, 16, 2), (64, 8, 16, 2), (32, 4, 8, 2), (8, 8, 16, 1), (4, 1, 2, 2), (6, 3, 2, 2),
    (3, 3, 2, 1),
])
def test_key_value_heads_are_repeated_only_as_far_as_the_ranks_need(heads, kv, size, repeat):
    # (8, 8, 16): fewer heads than ranks, (3, 3, 2): heads that do not divide; both go through padding instead
    assert kv_repeats(heads, kv, size) == repeat


def _groups_on_rank(rank: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from lmtune.core import dist as ldist
    from lmtune.dataset.samplers import DefaultSampler

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    try:
        ldist.init_sequence_parallel(2)
        summed = torch.tensor([float(rank)])
        dist.all_reduce(summed, group=ldist.sequence_parallel_group())
        across = torch.tensor([float(rank)])
        dist.all_reduce(across, group=ldist._SEQUENCE_PARALLEL["data_group"])
        sampler = DefaultSampler(list(range(10)), shuffle=True, seed=3)
        info = {"sp_rank": ldist.sequence_parallel_rank(), "dp_rank": ldist.data_parallel_rank(),
                "dp_size": ldist.data_parallel_world_size(), "sp_sum": summed.item(), "dp_sum": across.item(),
                "indices": list(sampler)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_groups_and_the_data_each_rank_reads(tmp_path):
    """4 ranks at sequence parallel 2: groups {0,1} and {2,3} share rows (the same sampler indices), and the
    data is sharded over the two groups as over two data-parallel ranks."""
    import json

    import torch.multiprocessing as mp

    from lmtune.core import dist as ldist
    from lmtune.dataset.samplers import DefaultSampler

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_groups_on_rank, args=(port, str(tmp_path)), nprocs=4, join=True)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [i["sp_rank"] for i in info] == [0, 1, 0, 1] and [i["dp_rank"] for i in info] == [0, 0, 1, 1]
    assert {i["dp_size"] for i in info} == {2}
    assert [i["sp_sum"] for i in info] == [1.0, 1.0, 5.0, 5.0]  # 0+1 and 2+3
    assert [i["dp_sum"] for i in info] == [2.0, 4.0, 2.0, 4.0]  # 0+2 and 1+3
    assert info[0]["indices"] == info[1]["indices"] and info[2]["indices"] == info[3]["indices"]
    # the two groups read what two plain data-parallel ranks would
    two_ranks = []
    for rank in (0, 1):
        sampler = DefaultSampler(list(range(10)), shuffle=True, seed=3)
        sampler.rank, sampler.world_size = rank, 2
        sampler.num_samples, sampler.total_size = 5, 10
        two_ranks.append(list(sampler))
    assert [info[0]["indices"], info[2]["indices"]] == two_ranks
    # one process: no groups, every rank its own
    assert ldist.sequence_parallel_size() == 1 and ldist.data_parallel_world_size() == 1
    with pytest.raises(Exception, match="must be a positive integer dividing the number of processes"):
        ldist.init_sequence_parallel(3)


def _row() -> dict:
    """One packed row of samples of 7, 6 and 4 tokens (17: padded to 18 for two ranks), part of each trained."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (1, 17), generator=gen)
    labels = ids.clone()
    labels[0, :3] = labels[0, 7:9] = labels[0, 13:14] = -100  # each sample's prompt
    positions = torch.tensor([list(range(7)) + list(range(6)) + list(range(4))])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


# the variants of the model-level test: (activation checkpointing, QLoRA: 4-bit NF4 base weights with LoRA, FSDP2)
VARIANTS = [(False, False, False), (True, False, False), (True, True, False), (True, False, True)]


def _model(model_dir: str, checkpointing: bool, qlora: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lmtune.model.sft import SupervisedFinetune

    torch.manual_seed(0)
    llm = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=model_dir, dtype=torch.float32)
    lora = None
    if qlora:
        llm["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32)
        lora = dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = SupervisedFinetune(llm=llm, lora=lora, use_activation_checkpointing=checkpointing)
    if qlora:  # LoRA's B starts at zero, so A would get no gradient: give B values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def _model_on_rank(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lmtune.core import dist as ldist
    from lmtune.engine.strategies.fsdp2 import FSDP2Strategy
    from lmtune.engine.strategies.sequence_parallel import shard_batch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ldist.init_sequence_parallel(2)
        results = []
        for checkpointing, qlora, fsdp2 in VARIANTS:
            model = _model(model_dir, checkpointing, qlora).train()
            if fsdp2:  # every decoder layer and the model sharded over both ranks; the gradients averaged
                FSDP2Strategy(torch.device("cpu")).wrap_model(model)
            row = _row()
            row.update(cumulative_len=[torch.tensor([0, 7, 13, 17])], max_seqlen=[7])  # use_varlen_attn's batch
            batch = shard_batch(row)
            assert batch["input_ids"].shape == (1, 9)  # this rank's half of the padded row
            out = model(**batch)
            out["loss_sum"].backward()
            grads = {n: (p.grad.full_tensor() * 2 if fsdp2 else p.grad)
                     for n, p in model.named_parameters() if p.grad is not None}
            results.append({"loss_sum": out["loss_sum"].detach(), "tokens": out["num_tokens"], "grads": grads})
        torch.save(results, f"{out_dir}/model{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_row_split_over_two_ranks_gives_the_loss_and_gradients_of_one_process(tmp_path, tiny_model_dir):
    """The tiny Llama on one packed row (given with use_varlen_attn's arguments, which the split drops): the two
    ranks' slice losses add up to the row's loss, and their gradients to its gradients (fp32), with and without
    activation checkpointing (the exchanges run again in the recompute), for QLoRA's adapters, and under FSDP2
    (sharded weights gathered around each layer, gradients reduce-scattered)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_model_on_rank, args=(port, tiny_model_dir, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"model{r}.pt") for r in (0, 1)]
    for n, (checkpointing, qlora, fsdp2) in enumerate(VARIANTS):
        model = _model(tiny_model_dir, checkpointing, qlora).train()
        out = model(**_row())
        out["loss_sum"].backward()
        parts = [ranks[0][n], ranks[1][n]]
        assert int(parts[0]["tokens"] + parts[1]["tokens"]) == int(out["num_tokens"]) == 11
        whole = float(out["loss_sum"].detach())
        assert float(parts[0]["loss_sum"] + parts[1]["loss_sum"]) == pytest.approx(whole, rel=1e-5)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert grads and set(grads) == set(parts[0]["grads"]) == set(parts[1]["grads"])
        assert all("lora_" in name for name in grads) == qlora
        for name, grad in grads.items():
            # FSDP2's gradient is the ranks' sum on every rank (the average, doubled)
            total = parts[0]["grads"][name] if fsdp2 else parts[0]["grads"][name] + parts[1]["grads"][name]
            torch.testing.assert_close(total, grad, rtol=1e-4, atol=1e-5,
                                       msg=f"checkpointing={checkpointing} qlora={qlora} fsdp2={fsdp2} {name}")


def test_what_sequence_parallelism_refuses(monkeypatch, tiny_model_dir):
    """Preference and other models, attention other than lmtune's packed SDPA, and batch keys that describe
    the whole row stop with a message; a model on sdpa passes."""
    from transformers import AutoModelForCausalLM

    from lmtune.config import ConfigError
    from lmtune.engine.strategies import sequence_parallel as sp
    from lmtune.model.sft import SupervisedFinetune

    monkeypatch.setattr(sp, "sequence_parallel_size", lambda: 2)
    with pytest.raises(ConfigError, match="for supervised fine-tuning .* only so far, not Linear"):
        sp.check_sequence_parallel(torch.nn.Linear(1, 1))
    eager = SupervisedFinetune(llm=dict(type=AutoModelForCausalLM.from_pretrained, attn_implementation="eager",
                                        pretrained_model_name_or_path=tiny_model_dir, dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"needs the model's attention on lmtune's packed SDPA .* \(eager\)"):
        sp.check_sequence_parallel(eager)
    sp.check_sequence_parallel(_model(tiny_model_dir, False))
    # flash-attn, asked for by name or by use_varlen_attn, gives way to the packed SDPA (which runs the exchange)
    from lmtune.model import build as model_build

    monkeypatch.setattr(model_build, "sequence_parallel_size", lambda: 2)
    for extra, varlen in (({"attn_implementation": "flash_attention_2"}, False), ({}, True)):
        flash = SupervisedFinetune(llm=dict(type=AutoModelForCausalLM.from_pretrained, dtype=torch.float32,
                                            pretrained_model_name_or_path=tiny_model_dir, **extra),
                                   use_varlen_attn=varlen)
        sp.check_sequence_parallel(flash)
        assert flash.packed_sdpa
    with pytest.raises(ConfigError, match=r"also holds \['attention_mask'\]"):
        sp.shard_batch({**_row(), "attention_mask": torch.ones(1, 17, dtype=torch.bool)})
