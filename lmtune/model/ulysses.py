"""DeepSpeed-Ulysses' exchange for sequence parallelism: each rank of a sequence-parallel group holds a slice of
the sequence for every attention head; two all-to-alls give each rank the whole sequence for a share of the heads
(where attention runs as in one process), and give the result back as the slice of the sequence for every head.

The exchange is differentiable (its backward is the same exchange the other way), so the gradients of a model
whose attention runs through ``ulysses_attention`` are those of the unsplit model. Heads that do not divide by
the group's size are padded with zero heads (their output is dropped: exact, at the cost of the padded heads'
compute); key/value heads of grouped-query attention are repeated only as far as the group's size needs.

This module holds the exchange alone: the process groups are ``lmtune.core.dist``'s, the slicing of the batch and
the loss across slices ``lmtune.engine.strategies.sequence_parallel``'s, and ``lmtune.model.packed_attention``
runs each layer's attention through ``ulysses_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Split ``x`` into the group's size along ``scatter_dim``, send part ``r`` to rank ``r``, and join what
    arrives along ``gather_dim``; the backward pass sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    parts = [part.contiguous() for part in torch.tensor_split(x, size, dim=scatter_dim)]
    if len({part.shape for part in parts}) != 1:
        raise ValueError(f"dimension {scatter_dim} of size {x.shape[scatter_dim]} does not split evenly over "
                         f"{size} ranks")
    send = torch.stack(parts)  # (size, ...): part r goes to rank r
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(list(received.unbind(0)), dim=gather_dim)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """The differentiable exchange of ``x`` over ``group``."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def kv_repeats(heads: int, kv_heads: int, size: int) -> int:
    """How many times each key/value head is repeated before the exchange: the fewest copies that make the
    key/value heads divide by ``size`` while every rank's query heads still map onto its own key/value heads;
    all of them (plain multi-head attention) when no fewer do."""
    group = heads // kv_heads
    for r in range(1, group + 1):
        if group % r == 0 and (kv_heads * r) % size == 0 and heads % size == 0:
            return r
    return group


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Attention of this rank's slice of the sequence, through the whole sequence.

    ``query`` ``(batch, heads, local, dim)``, ``key``/``value`` ``(batch, kv_heads, local, dim_k/dim_v)``: the
    rank's contiguous slice (rank ``r`` of the group holds positions ``r*local`` to ``(r+1)*local``).
    ``attend(q, k, v)`` is the attention over the whole sequence (the model's own, with the whole rows' sample
    bounds) for ``(batch, h, length, dim)`` inputs with as many query as key/value heads or a whole multiple of
    them; it returns ``(batch, h, length, dim_v)``. Returns ``(batch, heads, local, dim_v)``."""
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    heads, kv_heads = query.shape[1], key.shape[1]
    if size == 1:
        return attend(query, key, value)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key/value heads")
    repeat = kv_repeats(heads, kv_heads, size)
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    padded = -heads % size
    if padded:  # zero heads, as many as make the heads divide: one per query head's own copy of key/value
        if key.shape[1] != heads:
            key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
        query, key, value = (torch.cat([t, t.new_zeros(t.shape[0], padded, *t.shape[2:])], dim=1)
                             for t in (query, key, value))
    # (batch, heads, local, dim) -> (batch, heads / size, length, dim)
    q, k, v = (all_to_all(t, group, scatter_dim=1, gather_dim=2) for t in (query, key, value))
    out = attend(q, k, v)
    out = all_to_all(out, group, scatter_dim=2, gather_dim=1)  # back: (batch, heads (+ padding), local, dim_v)
    return out[:, :heads] if padded else out
