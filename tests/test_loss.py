"""The chunked loss: same numbers and gradients as the plain loss, without ever holding all the logits."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmtune.config import ConfigError
from lmtune.core.constants import IGNORE_INDEX
from lmtune.model import loss as loss_mod
from lmtune.model.loss import LogitTransform, choose_impl, linear_cross_entropy_sum
from lmtune.model.sft import SupervisedFinetune

GEMMA_LIKE = LogitTransform(scale=0.5, softcap=3.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def problem(n=300, hidden=32, vocab=1000, bias=True, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias)
    h = torch.randn(n, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    t[::7] = IGNORE_INDEX
    return head, h, t


def reference(head, h, t, transform=LogitTransform()):
    loss = F.cross_entropy(transform(head(h)), t, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, torch.autograd.grad(loss * 3, [h, *head.parameters()])


# ------------------------------------------------------------------ exactness of the function itself

@pytest.mark.parametrize("impl", ["linear", "module", "checkpoint"])
@pytest.mark.parametrize("transform", [LogitTransform(), GEMMA_LIKE], ids=["plain-logits", "scaled-softcapped"])
def test_chunked_equals_plain_loss_and_gradients(impl, transform):
    head, h, t = problem()
    ref, ref_grads = reference(head, h, t, transform)
    for chunk in (1, 7, 64, 299, 300, 4096):  # 7, 64 and 299 do not divide the 300 tokens
        out = linear_cross_entropy_sum(h, head, t, chunk, transform, impl=impl)
        grads = torch.autograd.grad(out * 3, [h, *head.parameters()])
        assert out.dtype == torch.float32
        assert rel_err(out, ref) <= 1e-6, (chunk, float(out), float(ref))
        for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
            assert rel_err(g, r) <= 1e-6, (chunk, name, rel_err(g, r))


@pytest.mark.parametrize("impl", ["linear", "module"])
@pytest.mark.parametrize("transform", [LogitTransform(), GEMMA_LIKE], ids=["plain-logits", "scaled-softcapped"])
def test_under_bf16_autocast_it_matches_the_plain_loss(impl, transform):
    """Mixed precision as in training: fp32 weights, bf16 matmuls, fp32 loss and weight gradient."""
    head, h, t = problem(n=500, hidden=64, vocab=3000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(transform(head(h)), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [h, *head.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy_sum(h, head, t, 128, transform, impl=impl)
    grads = torch.autograd.grad(out, [h, *head.parameters()])
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-4
    for g, r, p in zip(grads, ref_grads, (h, *head.parameters())):
        assert g.dtype == p.dtype == torch.float32
        assert rel_err(g, r) <= 1e-2  # bf16 rounding of the logits' gradient, in a different order


def test_bf16_weights_without_autocast_accumulate_the_weight_gradient_in_fp32():
    """A bf16 head trained without autocast: bf16 matmuls, fp32 sums of the per-chunk weight gradients."""
    head, h, t = problem(n=500, hidden=64, vocab=3000)
    ref, ref_grads = reference(head, h, t)
    head16 = head.to(torch.bfloat16)
    h16 = h.detach().to(torch.bfloat16).requires_grad_()
    out = linear_cross_entropy_sum(h16, head16, t, 64, impl="linear")
    grads = torch.autograd.grad(out * 3, [h16, *head16.parameters()])
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 2e-2


def test_half_precision_chunks_on_cpu_run_matmuls_of_a_few_shapes_only():
    """oneDNN compiles a kernel per matmul shape: the last, partial chunk is padded to a multiple of 64 rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out,
                        torch.ops.aten.addmm.default):
                mats = args[1:3] if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm.out) else args[:2]
                self.rows.update(size for a in mats for size in a.shape if size not in (64, 3000))
            return func(*args, **(kwargs or {}))

    head, h, t = problem(n=500, hidden=64, vocab=3000)
    for n in (500, 301, 77):
        with Shapes() as shapes, torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear_cross_entropy_sum(h[:n], head, t[:n], 128, impl="linear")
        assert shapes.rows <= {128}, (n, shapes.rows)  # every chunk's matmuls are 128 rows long
        ref = F.cross_entropy(head(h[:n]).float(), t[:n], ignore_index=IGNORE_INDEX, reduction="sum")
        assert rel_err(out, ref) <= 1e-2


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    head, h, t = problem(bias=False)
    head.weight.requires_grad_(False)
    ref = F.cross_entropy(head(h), t, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, [h])
    out = linear_cross_entropy_sum(h, head, t, 64)
    out.backward()
    assert head.weight.grad is None
    assert rel_err(h.grad, ref_grad) <= 1e-6


def test_no_targets_still_backpropagates_zeros():
    head, h, _ = problem()
    out = linear_cross_entropy_sum(h[:0], head, torch.zeros(0, dtype=torch.long), 64)
    out.backward()
    assert float(out.detach()) == 0.0
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0


def test_without_grad_it_only_computes_the_loss():
    head, h, t = problem()
    ref, _ = reference(head, h, t)
    with torch.no_grad():
        out = linear_cross_entropy_sum(h, head, t, 64)
    assert out.grad_fn is None and rel_err(out, ref) <= 1e-6


def test_bad_arguments():
    head, h, t = problem()
    with pytest.raises(ValueError):
        linear_cross_entropy_sum(h[None], head, t, 64)
    with pytest.raises(ValueError):
        linear_cross_entropy_sum(h, head, t, 0)
    with pytest.raises(ValueError):
        linear_cross_entropy_sum(h, head, t, 64, impl="fast")


# ------------------------------------------------------------------ memory

def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for a backward pass while ``fn`` runs (inner graphs included)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def graph_shapes(out: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors the graph behind ``out`` holds: saved tensors and what custom functions keep."""
    shapes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "grads":
                value = getattr(node, name, None)
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if torch.is_tensor(t):
                        shapes.append(tuple(t.shape))
        stack.extend(fn for fn, _ in node.next_functions)
    return shapes


@pytest.mark.parametrize("impl", ["linear", "module", "checkpoint"])
def test_graph_never_holds_all_logits(impl):
    n, hidden, vocab = 600, 32, 1000
    head, h, t = problem(n=n, hidden=hidden, vocab=vocab)
    plain = F.cross_entropy(head(h), t, reduction="sum")
    assert (n, vocab) in graph_shapes(plain)  # the check can see what it looks for
    out = {}
    saved = saved_shapes(lambda: out.setdefault("loss", linear_cross_entropy_sum(h, head, t, 128, impl=impl)))
    held = graph_shapes(out["loss"]) + saved
    assert (n, vocab) not in held and (vocab, n) not in held
    assert all(torch.Size(s).numel() <= max(128 * vocab, n * hidden, vocab * hidden) for s in held)
    if impl != "checkpoint":  # the gradients are ready before the backward pass
        assert (n, hidden) in graph_shapes(out["loss"]) and (vocab, hidden) in graph_shapes(out["loss"])
    out["loss"].backward()


def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated on the CPU while ``fn`` runs, above what was allocated before it.

    Read from the allocator events of torch's profiler; each carries the allocator's running total
    (which, across profiler sessions, does not start from zero: the first event gives the base).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    base = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - base


def test_chunked_loss_peak_memory_is_a_fraction_of_the_plain_one():
    n, hidden, vocab, chunk = 1024, 64, 32000, 128
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (n,))

    def plain():
        F.cross_entropy(head(h), t, reduction="sum").backward()

    def chunked():
        linear_cross_entropy_sum(h, head, t, chunk).backward()

    try:
        plain_peak, chunked_peak = peak_cpu_bytes(plain), peak_cpu_bytes(chunked)
    except (ImportError, AttributeError) as exc:  # private profiler API moved
        pytest.skip(f"no allocator events from the profiler: {exc}")
    logits = n * vocab * 4
    print(f"\npeak CPU memory, {n} tokens x {vocab} vocab (fp32 logits {logits / 2**20:.0f} MiB): "
          f"plain {plain_peak / 2**20:.0f} MiB, chunked ({chunk} tokens) {chunked_peak / 2**20:.0f} MiB")
    assert plain_peak >= 2 * logits  # logits and their gradient (at least)
    assert chunked_peak < plain_peak / 4


# ------------------------------------------------------------------ which implementation runs

def test_choose_impl():
    linear = nn.Linear(8, 16)
    assert choose_impl(linear, "cpu", liger=True) == "linear"
    assert choose_impl(linear, "cuda", liger=True) == "liger"
    assert choose_impl(linear, "cuda", liger=False) == "linear"
    assert choose_impl(linear, "cuda", LogitTransform(softcap=30.0), liger=True) == "liger"
    assert choose_impl(linear, "cuda", LogitTransform(scale=0.0625), liger=True) == "linear"
    wrapped = nn.Sequential(nn.Linear(8, 16))  # e.g. a PEFT wrapper around the head
    assert choose_impl(wrapped, "cuda", liger=True) == "module"
    assert choose_impl(wrapped, "cpu", liger=False) == "module"
    partitioned = nn.Linear(8, 16)
    partitioned.weight.ds_id = 3  # a DeepSpeed ZeRO-3 partition
    assert choose_impl(partitioned, "cuda", liger=True) == "checkpoint"
    assert choose_impl(partitioned, "cpu", liger=False) == "checkpoint"
    with pytest.raises(ValueError, match="nn.Linear"):
        linear_cross_entropy_sum(torch.randn(3, 8), wrapped, torch.zeros(3, dtype=torch.long), impl="linear")


def test_liger_availability_is_detected(monkeypatch):
    monkeypatch.setattr(loss_mod.importlib.util, "find_spec", lambda name: object())
    assert loss_mod.liger_available() and choose_impl(nn.Linear(8, 16), "cuda") == "liger"
    monkeypatch.setattr(loss_mod.importlib.util, "find_spec", lambda name: None)
    assert not loss_mod.liger_available() and choose_impl(nn.Linear(8, 16), "cuda") == "linear"


def test_liger_is_called_with_the_head_weight_and_sum_reduction(monkeypatch):
    calls = []

    class FakeLigerLoss:  # stands in for liger_kernel's fused linear cross-entropy
        def __init__(self, ignore_index=-100, reduction="mean", softcap=None):
            calls.append(dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap))
            self.transform = LogitTransform(softcap=softcap)

        def __call__(self, lin_weight, _input, target, bias=None):
            return F.cross_entropy(self.transform(F.linear(_input, lin_weight, bias)), target,
                                   ignore_index=calls[-1]["ignore_index"], reduction=calls[-1]["reduction"])

    module = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyLoss = FakeLigerLoss
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    head, h, t = problem()
    transform = LogitTransform(softcap=3.0)
    ref, ref_grads = reference(head, h, t, transform)
    out = linear_cross_entropy_sum(h, head, t, 64, transform, impl="liger")
    grads = torch.autograd.grad(out * 3, [h, *head.parameters()])
    assert calls == [dict(ignore_index=IGNORE_INDEX, reduction="sum", softcap=3.0)]
    assert rel_err(out, ref) <= 1e-6
    assert all(rel_err(g, r) <= 1e-6 for g, r in zip(grads, ref_grads))


def test_logit_transform_from_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert LogitTransform.from_config(LlamaConfig()).is_identity
    assert LogitTransform.from_config(Gemma2Config(final_logit_softcapping=30.0)) == LogitTransform(softcap=30.0)
    assert LogitTransform.from_config(Gemma2Config(final_logit_softcapping=None)).is_identity
    assert LogitTransform.from_config(CohereConfig(logit_scale=0.0625)) == LogitTransform(scale=0.0625)
    assert LogitTransform.from_config(GraniteConfig(logits_scaling=8.0)) == LogitTransform(scale=0.125)


# ------------------------------------------------------------------ inside SupervisedFinetune

def tiny_config(cls_name="LlamaConfig", **extra):
    import transformers

    return getattr(transformers, cls_name)(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2, **extra)


def tiny_llm(config=None, seed=0, cls=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config or tiny_config()
    return cls(config) if cls is not None else AutoModelForCausalLM.from_config(config)


def packed_batch(vocab=97, seed=1):
    """Two rows; the first packs samples of 9 and 7 tokens, the second is one sample of 12 plus padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (2, 16), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[0, 9:11] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX
    input_ids[1, 12:] = 0
    position_ids = torch.tensor([list(range(9)) + list(range(7)), list(range(12)) + list(range(4))])
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids)


def grads_of(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    (out["loss_sum"] * 0.5).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_paths(make_model, batch=None, chunk=5):
    batch = batch or packed_batch()
    plain = make_model(0)
    chunked = make_model(chunk)
    chunked.load_state_dict(plain.state_dict())
    out_p, g_p = grads_of(plain, batch)
    out_c, g_c = grads_of(chunked, batch)
    assert chunked._chunked_loss_ok is True and plain._chunked_loss_ok is None
    assert int(out_c["num_tokens"]) == int(out_p["num_tokens"])
    assert rel_err(out_c["loss_sum"], out_p["loss_sum"]) <= 1e-6
    assert g_p.keys() == g_c.keys() and g_p
    for name in g_p:
        assert rel_err(g_c[name], g_p[name]) <= 1e-5, name
    return chunked


@pytest.mark.parametrize("tied", [False, True])
def test_full_finetune_chunked_equals_plain(tied):
    def make(chunk):
        return SupervisedFinetune(tiny_llm(tiny_config(tie_word_embeddings=tied)), use_activation_checkpointing=False,
                                  loss_chunk_size=chunk)

    model = compare_paths(make)
    assert len(list(model.parameters())) == len(dict(model.named_parameters()))


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
], ids=["lora", "lora-modules-to-save-head", "lora-on-head"])
def test_lora_chunked_equals_plain(lora):
    from peft import LoraConfig

    def make(chunk):
        torch.manual_seed(5)  # same adapter initialisation
        model = SupervisedFinetune(tiny_llm(), lora=LoraConfig(init_lora_weights=False, **lora),
                                   use_activation_checkpointing=True, loss_chunk_size=chunk)
        return model

    model = compare_paths(make)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if "modules_to_save" in lora:
        assert any("modules_to_save" in n for n in trainable)
    if "lm_head" in lora["target_modules"]:
        assert any("lm_head.lora_A" in n for n in trainable)


@pytest.mark.parametrize("cls_name,extra", [
    ("Gemma2Config", dict(final_logit_softcapping=2.0, sliding_window=8)),
    ("CohereConfig", dict(logit_scale=0.25)),
])
def test_models_that_transform_their_logits(cls_name, extra):
    def make(chunk):
        return SupervisedFinetune(tiny_llm(tiny_config(cls_name, **extra)), use_activation_checkpointing=False,
                                  loss_chunk_size=chunk)

    model = compare_paths(make)
    assert not model._logit_transform.is_identity


def test_unknown_logit_transform_falls_back_to_the_plain_loss():
    from transformers import LlamaForCausalLM

    class Doubling(LlamaForCausalLM):  # does something to its logits that lmtune does not know of
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    batch = packed_batch()
    plain = SupervisedFinetune(tiny_llm(cls=Doubling), use_activation_checkpointing=False, loss_chunk_size=0)
    model = SupervisedFinetune(tiny_llm(cls=Doubling), use_activation_checkpointing=False, loss_chunk_size=4)
    out, ref = model(**batch), plain(**batch)
    assert model._chunked_loss_ok is False
    assert rel_err(out["loss_sum"], ref["loss_sum"]) <= 1e-6
    assert rel_err(model(**batch)["loss_sum"], ref["loss_sum"]) <= 1e-6  # and stays on the plain path


def test_loss_chunk_size_is_checked():
    for bad in (-1, 2.5, True, "1024"):
        with pytest.raises(ConfigError, match="loss_chunk_size"):
            SupervisedFinetune(tiny_llm(), use_activation_checkpointing=False, loss_chunk_size=bad)
    assert SupervisedFinetune(tiny_llm(), use_activation_checkpointing=False, loss_chunk_size=None).loss_chunk_size == 0
    assert SupervisedFinetune(tiny_llm(), use_activation_checkpointing=False).loss_chunk_size == "auto"


def test_auto_loss_chunks_hold_128_mib_of_fp32_logits_on_gpus_and_256_positions_on_cpus(monkeypatch):
    from lmtune.model import loss as loss_mod
    from lmtune.model import loss_kernels

    vocabs = (32000, 128256, 151936, 256000)
    assert [loss_mod.auto_chunk_size(v, "cuda") for v in vocabs] == [1024, 256, 192, 128]
    assert [loss_mod.auto_chunk_size(v, "cpu") for v in vocabs] == [256, 256, 256, 256]
    assert loss_mod.auto_chunk_size(10**6, "cpu") == 64
    assert loss_mod.auto_chunk_size(10**9) == loss_mod.auto_chunk_size(10**9, "cpu") == 64
    used = []
    real = loss_kernels._chunks
    monkeypatch.setattr(loss_kernels, "_chunks", lambda n, size: used.append(size) or real(n, size))
    monkeypatch.setattr(loss_mod, "CPU_CHUNK_POSITIONS", 128)  # the test batch is on the CPU
    model = SupervisedFinetune(tiny_llm(), use_activation_checkpointing=False)
    model(**packed_batch())
    assert model.llm.get_output_embeddings().weight.shape[0] == 97 and used == [128]
