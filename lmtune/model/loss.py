"""Token-level cross-entropy for causal language modelling.

Two ways to the same number:

- ``causal_lm_loss_sum``: cross-entropy of logits the model has already computed;
- ``linear_cross_entropy_sum``: cross-entropy of ``head(hidden)`` computed a chunk of
  tokens at a time, so that neither the forward nor the backward pass ever holds the
  logits of every token at once (with a 128k vocabulary, the fp32 logits of 16k tokens
  alone take 8 GiB, and their gradient as much again).

In all of the chunked implementations but ``"checkpoint"``, the forward pass computes each
chunk's logits, its loss and right away its gradients (of the hidden states and of the
head's trainable weights, accumulated in fp32), then drops the logits before the next
chunk; the backward pass only scales the stored gradients by the incoming one, in place.
The head's matmuls run in the autocast dtype when autocast is on, as they would in the
model. ``choose_impl`` picks, in this order:

``"liger"``
    Liger Kernel's fused linear cross-entropy (Triton, CUDA only), when ``liger_kernel``
    is importable, the head is a plain ``nn.Linear`` and the logits are at most softcapped.
``"linear"``
    A plain ``nn.Linear`` head: the gradient of the cross-entropy is written out
    (``softmax - one_hot``, through the scale and softcap), computed in place in one fp32
    buffer of the chunk's logits, and accumulated into the fp32 weight gradient by one
    matmul per chunk (on CUDA straight into fp32, ``addmm(out_dtype=float32)``).
``"module"``
    Any other head (PEFT's LoRA on the head or ``modules_to_save`` wrapper, a quantized
    head): the head module is called on each chunk and autograd differentiates the chunk.
``"checkpoint"``
    ``torch.utils.checkpoint`` around each chunk: the backward pass recomputes one chunk's
    logits at a time (one more head matmul). Used where the head's weights are usable only
    inside the module's own call: DeepSpeed ZeRO-3 partitions, sharded DTensors.

None of them holds a (tokens, vocab) tensor; the peak is a few (chunk, vocab) buffers plus
the fp32 gradient of the head's weight (which the plain path needs too).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.dist import is_sharded

DEFAULT_LOSS_CHUNK_SIZE = "auto"
# "auto" on accelerators: as many positions per chunk as keep one chunk's fp32 logits at 2**25 values
# (128 MiB): 1,024 positions for a 32k vocabulary, 256 for 128k, 192 for Qwen's 152k, 128 for 256k.
AUTO_CHUNK_LOGITS = 2**25
# "auto" on CPUs: 256 positions (fewer only past a 256k vocabulary, at most 2**26 logits), whatever the
# vocabulary: measured fastest at vocab 32k and 128k, in fp32 and bf16 (smaller chunks stay in the caches
# but make the head's matmuls inefficient; larger ones do not fit them)
CPU_CHUNK_POSITIONS = 256
CPU_CHUNK_LOGITS = 2**26


def auto_chunk_size(vocab_size: int, device: torch.device | str = "cuda") -> int:
    """Positions per loss chunk for a head of ``vocab_size`` outputs on ``device`` (multiples of 64, at least 64)."""
    vocab_size = max(int(vocab_size), 1)
    if torch.device(device).type == "cpu":
        return max(64, min(CPU_CHUNK_POSITIONS, CPU_CHUNK_LOGITS // vocab_size // 64 * 64))
    return max(64, AUTO_CHUNK_LOGITS // vocab_size // 64 * 64)


LOSS_IMPLS = ("liger", "linear", "module", "checkpoint")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position must predict: labels shifted left by one, IGNORE at the end."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_target_tokens(labels: torch.Tensor) -> int:
    """How many positions of a batch carry a loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the fp32 cross-entropy over positions whose target is not ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# ------------------------------------------------------------------ what models do to their logits

@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to the output of its head before the loss: ``softcap * tanh(scale * x / softcap)``.

    ``scale``: Cohere's ``logit_scale`` (multiplied), Granite's ``logits_scaling`` (divided);
    ``softcap``: Gemma 2/3's ``final_logit_softcapping``. Applied in fp32.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> LogitTransform:
        if config is None:
            return cls()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
        scale = 1.0
        if model_type.startswith("cohere") and getattr(text, "logit_scale", None):
            scale *= float(text.logit_scale)
        if model_type.startswith("granite") and getattr(text, "logits_scaling", None):
            scale /= float(text.logits_scaling)
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitTransform()


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    logits = transform(logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# ------------------------------------------------------------------ choosing an implementation

def liger_available() -> bool:
    """Whether Liger Kernel can be imported (it needs Triton and a GPU to run)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _is_plain_tensor(param: torch.Tensor) -> bool:
    """False for DeepSpeed ZeRO-3 partitions and DTensors: weights only usable inside their module's call."""
    return not is_sharded(param)


def choose_impl(head: nn.Module, device: torch.device | str, transform: LogitTransform = IDENTITY,
                liger: bool | None = None) -> str:
    """``"liger"``, ``"linear"``, ``"module"`` or ``"checkpoint"`` for this head on this device (see the module doc).

    ``liger``: whether Liger Kernel may be used (default: whether it is importable).
    """
    device = torch.device(device)
    if not all(_is_plain_tensor(p) for p in head.parameters()):
        return "checkpoint"
    if type(head) is not nn.Linear:
        return "module"
    if liger is None:
        liger = liger_available()
    if liger and device.type == "cuda" and transform.scale == 1.0:
        return "liger"
    return "linear"


# ------------------------------------------------------------------ the implementations

def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """Chunk boundaries; one empty chunk when there are no tokens, so the head stays in the graph."""
    if n == 0:
        return [(0, 0)]
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # pragma: no cover - device type without autocast
        pass
    return None


def _accumulator(p: torch.Tensor) -> torch.Tensor:
    """A zero gradient for ``p``, in fp32 when ``p`` is half precision."""
    return torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)


def _scaled_grads(ctx, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients the forward pass stored, times ``grad_output``, in place (they are used once)."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("the chunked loss can be back-propagated only once (retain_graph is not supported)")
    out = []
    for grad, dtype in zip(grads, ctx.dtypes):
        if grad is not None:
            grad = grad.mul_(grad_output.to(grad.dtype)).to(dtype)
        out.append(grad)
    return out


_FP32_OUT_ADDMM: dict[str, bool] = {}


def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` accumulates half-precision products into an fp32
    tensor on this device (CUDA in recent torch): checked once on small matrices."""
    if device.type not in _FP32_OUT_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(16, 32, generator=gen).to(device, torch.bfloat16)
                b = torch.randn(32, 8, generator=gen).to(device, torch.bfloat16)
                acc = torch.ones(16, 8, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _FP32_OUT_ADDMM[device.type] = ok
    return _FP32_OUT_ADDMM[device.type]


class _LinearChunkedCrossEntropy(torch.autograd.Function):
    """``"linear"``: hand-written gradients of ``CE(transform(hidden @ weight.T + bias))``, chunk by chunk.

    Per chunk: fp32 logits ``z`` (one buffer, modified in place, laid out (vocab, positions)),
    ``e = exp(z - max)`` and its sums ``S`` over the vocabulary;
    the loss is ``max + log S - z[target]``, and the gradient of the logits is ``(e - S * one_hot) / S``
    (times the transform's derivative), cast to the matmul dtype in the buffer the logits came in. The
    buffers are allocated once per call, not once per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        compute = _autocast_dtype(hidden.device.type) or weight.dtype
        w = weight.detach().to(compute)
        b = None if bias is None else bias.detach().to(compute)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = _accumulator(weight) if need_w else None
        grad_b = _accumulator(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        any_ignored = bool((targets == IGNORE_INDEX).any())  # SupervisedFinetune passes labelled positions only
        # the (chunk, vocab) buffers are allocated once and reused by every chunk: a fresh buffer of that
        # size costs page faults on each allocation (glibc maps large blocks anew), as much as the math on CPUs
        rows = min(chunk_size, hidden.shape[0])
        half = compute != torch.float32
        # oneDNN builds a kernel for every new matmul shape, ~30 ms for the head's backward matmul on a CPU:
        # there, a half-precision chunk whose length is not a multiple of 64 (the last one) is padded with
        # zero rows, which count as ignored positions, so only a few shapes ever occur
        pad = 64 if half and hidden.device.type == "cpu" else 1
        rows = -(-rows // pad) * pad
        vocab = w.shape[0]
        # the logits are computed transposed, (vocab, chunk) = weight @ hidden.T: the same numbers, but the
        # matmul runs 1.2x (fp32) to 2x (bf16) faster on CPUs than (chunk, vocab) = hidden @ weight.T
        z_flat = hidden.new_empty(vocab * rows, dtype=torch.float32)
        logits_flat = hidden.new_empty(vocab * rows, dtype=compute) if half else z_flat
        th_flat = torch.empty_like(z_flat) if transform.softcap is not None else None
        # a half-precision weight gradient goes into the fp32 accumulator: directly where the device can (CUDA),
        # else through one buffer for every chunk's product
        fp32_out = need_w and grad_w.dtype != compute and _fp32_out_addmm(w.device)
        grad_w_buf = torch.empty_like(w) if need_w and grad_w.dtype != compute and not fp32_out else None
        h_buf = hidden.new_empty((rows, w.shape[1]), dtype=compute) if pad > 1 else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start, end in _chunks(hidden.shape[0], chunk_size):
                n = end - start
                m = -(-n // pad) * pad
                t = targets[start:end]
                ignored = any_ignored
                if m == n:
                    h = hidden[start:end].detach().to(compute)
                else:
                    h = h_buf[:m]
                    h[:n].copy_(hidden[start:end].detach())
                    h[n:].zero_()
                    t = torch.cat([t, t.new_full((m - n,), IGNORE_INDEX)])
                    ignored = True
                logits = logits_flat[:vocab * m].view(vocab, m)  # contiguous (vocab, m) views of the buffers
                if b is not None:
                    torch.addmm(b[:, None], w, h.t(), out=logits)
                else:
                    torch.mm(w, h.t(), out=logits)
                z = z_flat[:vocab * m].view(vocab, m)
                if half:
                    z.copy_(logits)
                if transform.scale != 1.0:
                    z.mul_(transform.scale)
                th = None
                if transform.softcap is not None:
                    th = th_flat[:vocab * m].view(vocab, m)
                    torch.div(z, transform.softcap, out=th).tanh_()
                    torch.mul(th, transform.softcap, out=z)
                valid = t != IGNORE_INDEX
                safe_t = (torch.where(valid, t, 0) if ignored else t)[None, :]
                picked = z.gather(0, safe_t).squeeze(0)
                top = z.amax(dim=0, keepdim=True)
                e = z.sub_(top).exp_()
                sums = e.sum(dim=0)
                losses = top.squeeze(0) + sums.log() - picked
                total += (torch.where(valid, losses, 0.0) if ignored else losses).sum()
                if not need_grad:
                    continue
                e.scatter_add_(0, safe_t, -sums[None, :])  # e - S * one_hot
                if th is not None:  # d tanh(x) / dx = 1 - tanh(x)^2
                    e.mul_(th.mul_(th).neg_().add_(1.0))
                inv = transform.scale / sums if transform.scale != 1.0 else sums.reciprocal()
                if ignored:  # positions without a target get no gradient
                    inv = torch.where(valid, inv, 0.0)
                e.mul_(inv[None, :])
                # the logits' buffer is free again: it takes the gradient in the matmul dtype
                d = logits.copy_(e) if half else e
                if need_h:
                    grad_h[start:end] = (d.t() @ w)[:n]
                if need_w:
                    if grad_w_buf is not None:
                        grad_w.add_(torch.mm(d, h, out=grad_w_buf))
                    elif fp32_out:
                        torch.addmm(grad_w, d, h, out_dtype=grad_w.dtype, out=grad_w)
                    else:
                        grad_w.addmm_(d, h)
                if need_b:
                    grad_b.add_(d.sum(1, dtype=grad_b.dtype))
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.dtypes = [hidden.dtype, weight.dtype, None if bias is None else bias.dtype]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = _scaled_grads(ctx, grad_output)
        return grad_h, grad_w, grad_b, None, None, None


class _ModuleChunkedCrossEntropy(torch.autograd.Function):
    """``"module"``: autograd through the head module, one chunk at a time, inside the forward pass."""

    @staticmethod
    def forward(ctx, hidden, targets, head, transform, chunk_size, names, *params):
        need_h = ctx.needs_input_grad[0]
        device_type = hidden.device.type
        cast_to = _autocast_dtype(device_type)
        # one detached leaf per trainable weight, reused by every chunk (so autocast casts it once)
        leaves = {name: p.detach().requires_grad_() for name, p in zip(names, params)}
        swapped: dict[str, torch.Tensor] = dict(leaves)
        if cast_to is not None:  # frozen matrices: cast once too, not once per chunk
            for name, p in head.named_parameters():
                if (name not in swapped and not p.requires_grad and p.dim() == 2 and p.dtype != cast_to
                        and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                        and type(p) in (torch.Tensor, nn.Parameter)):
                    swapped[name] = p.detach().to(cast_to)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_params = [_accumulator(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(hidden.shape[0], chunk_size):
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(need_h)
                loss = _ce_sum(torch.func.functional_call(head, swapped, (h,)), targets[start:end], transform)
                wrt = ([h] if need_h else []) + list(leaves.values())
                with torch.autocast(device_type, enabled=False):  # as a backward pass outside autocast
                    grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if wrt else []
            total += loss.detach()
            if need_h:
                g = grads.pop(0)
                if g is None:
                    grad_h[start:end] = 0
                else:
                    grad_h[start:end] = g
            for acc, g in zip(grad_params, grads):
                if g is not None:
                    acc.add_(g)
            del loss, grads
        ctx.grads = [grad_h, *grad_params]
        ctx.dtypes = [hidden.dtype, *(p.dtype for p in params)]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, *grad_params = _scaled_grads(ctx, grad_output)
        return (grad_h, None, None, None, None, None, *grad_params)


def _head_loss(head, h, t, transform):
    return _ce_sum(head(h), t, transform)


def _checkpointed(hidden, head, targets, chunk_size, transform):
    from torch.utils.checkpoint import checkpoint

    total = None
    for start, end in _chunks(hidden.shape[0], chunk_size):
        loss = checkpoint(_head_loss, head, hidden[start:end], targets[start:end], transform, use_reentrant=False)
        total = loss if total is None else total + loss
    return total


def _liger(hidden, head, targets, transform):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    device_type = hidden.device.type
    dtype = _autocast_dtype(device_type) or head.weight.dtype
    kwargs: dict[str, Any] = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if transform.softcap is not None:
        kwargs["softcap"] = transform.softcap
    loss_fn = LigerFusedLinearCrossEntropyLoss(**kwargs)
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(device_type, enabled=False):  # Liger wants one dtype for the input and the weight
        loss = loss_fn(head.weight.to(dtype), hidden.to(dtype), targets, bias)
    if isinstance(loss, (tuple, list)):  # versions that also return the z-loss
        loss = loss[0]
    return loss.float()


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE, transform: LogitTransform = IDENTITY,
                             impl: str | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``transform(head(hidden))`` against ``targets``, ``chunk_size`` tokens at a time.

    ``hidden``: (tokens, hidden_size); ``targets``: (tokens,), ``IGNORE_INDEX`` allowed (pass only the
    positions that carry a loss to save work). ``impl`` forces an implementation (``LOSS_IMPLS``;
    ``"linear"`` and ``"liger"`` need an ``nn.Linear`` head); by default ``choose_impl`` picks one.
    Without gradients to compute, the chunks simply run one after the other under ``no_grad``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (tokens, hidden_size) and targets (tokens,); got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if chunk_size == "auto":
        weight = getattr(head, "weight", None)
        chunk_size = auto_chunk_size(getattr(head, "out_features", None)
                                     or (weight.shape[0] if torch.is_tensor(weight) else 0), hidden.device)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    impl = impl or choose_impl(head, hidden.device, transform)
    if impl not in LOSS_IMPLS:
        raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl in ("linear", "liger") and not isinstance(head, nn.Linear):
        raise ValueError(f"impl={impl!r} needs an nn.Linear head, not {type(head).__name__}")
    if impl == "liger":
        return _liger(hidden, head, targets, transform)
    params = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    if not (torch.is_grad_enabled() and (hidden.requires_grad or params)):
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start, end in _chunks(hidden.shape[0], chunk_size):
                total += _head_loss(head, hidden[start:end], targets[start:end], transform)
            return total
    if impl == "checkpoint":
        return _checkpointed(hidden, head, targets, chunk_size, transform)
    if impl == "linear":
        return _LinearChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, transform, chunk_size)
    return _ModuleChunkedCrossEntropy.apply(hidden, targets, head, transform, chunk_size,
                                            tuple(name for name, _ in params), *(p for _, p in params))
