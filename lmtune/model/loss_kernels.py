"""The chunked cross-entropy kernels behind ``lmtune.model.loss.linear_cross_entropy_sum`` (see its module doc
for what each does and when it is chosen), and the logit transforms they reproduce."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.core.constants import IGNORE_INDEX

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


def _linear_chunks(hidden, weight, bias, targets, transform, chunk_size, need_h: bool, need_w: bool,
                   need_b: bool, per_token: bool = False):
    """The chunk loop of ``_LinearChunkedCrossEntropy`` (see its doc): the summed loss (``per_token``: each
    position's loss, 0 where ignored) and the gradients of that sum, ``[grad_h, grad_w, grad_b]``."""
    need_grad = need_h or need_w or need_b
    compute = _autocast_dtype(hidden.device.type) or weight.dtype
    w = weight.detach().to(compute)
    b = None if bias is None else bias.detach().to(compute)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = _accumulator(weight) if need_w else None
    grad_b = _accumulator(bias) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    per_position = hidden.new_zeros(hidden.shape[0], dtype=torch.float32) if per_token else None
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
            kept = torch.where(valid, losses, 0.0) if ignored else losses
            if per_token:
                per_position[start:end] = kept[:n]
            else:
                total += kept.sum()
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
    return (per_position if per_token else total), [grad_h, grad_w, grad_b]


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
        total, ctx.grads = _linear_chunks(hidden, weight, bias, targets, transform, chunk_size,
                                          *ctx.needs_input_grad[:3])
        ctx.dtypes = [hidden.dtype, weight.dtype, None if bias is None else bias.dtype]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = _scaled_grads(ctx, grad_output)
        return grad_h, grad_w, grad_b, None, None, None


class _LinearTokenCrossEntropy(torch.autograd.Function):
    """Each position's cross-entropy of ``transform(hidden @ weight.T + bias)``, for a head that is not trained
    (LoRA, QLoRA): the gradient of every position's loss with respect to its hidden state is computed in the
    forward pass, chunk by chunk as ``"linear"`` does, and the backward pass scales each by its incoming
    gradient. No logits are kept, and none are recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size):
        losses, (ctx.grad_h, _, _) = _linear_chunks(hidden, weight, bias, targets, transform, chunk_size,
                                                    ctx.needs_input_grad[0], False, False, per_token=True)
        ctx.dtype = hidden.dtype
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, ctx.grad_h = ctx.grad_h, None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_output.to(grad_h.dtype)[:, None]).to(ctx.dtype)
        return grad_h, None, None, None, None, None


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


def _head_token_logps(head, h, t, transform):
    logits = transform(head(h))
    return -F.cross_entropy(logits, t, reduction="none")


def _checkpointed_token_logps(hidden, head, targets, chunk_size, transform):
    """Per-token log-probabilities, a chunk at a time; the backward pass recomputes one chunk's logits at a time."""
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start, end in _chunks(hidden.shape[0], chunk_size):
        if grad:
            parts.append(checkpoint(_head_token_logps, head, hidden[start:end], targets[start:end], transform,
                                    use_reentrant=False))
        else:
            parts.append(_head_token_logps(head, hidden[start:end], targets[start:end], transform))
    return torch.cat(parts)


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
