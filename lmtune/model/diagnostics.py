"""Checks of a built model that keep training exact."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def packing_leak(model: nn.Module, segment: int = 8) -> float:
    """How much the logits of a packed sample change because another sample precedes it.

    Two samples are packed into one row (positions restarting at the second)
    and the second is also run alone. With attention that keeps packed samples
    apart the difference is float noise; a model whose attention ignores the
    restart (some remote-code models do) lets the second sample see the first.
    Returns the largest difference relative to the mean logit magnitude, less
    four times the rounding noise of the dtype: the difference between the
    sample alone and the same sample followed by the other one (which causal
    attention must not see either). In fp32 that noise is ~1e-7; in bf16 it
    reaches a few percent of a random model's small logits, which a real leak
    exceeds by far.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = model.llm.get_input_embeddings().num_embeddings
        first = torch.arange(3, 3 + segment, device=device) % vocab
        second = torch.arange(11, 11 + segment, device=device) % vocab
        packed_ids = torch.cat([first, second])[None]
        positions = torch.cat([torch.arange(segment), torch.arange(segment)]).to(device)[None]
        packed = model.llm(input_ids=packed_ids, position_ids=positions, use_cache=False,
                          **model._attention_kwargs(positions, None)).logits[0, segment:]
        alone = model.llm(input_ids=second[None], position_ids=positions[:, :segment],
                         use_cache=False).logits[0]
        followed = model.llm(input_ids=torch.cat([second, first])[None],
                            position_ids=torch.arange(2 * segment, device=device)[None],
                            use_cache=False).logits[0, :segment]
        packed, alone, followed = packed.float(), alone.float(), followed.float()
        scale = alone.abs().mean().clamp(min=1e-6)
        leak = float((packed - alone).abs().max() / scale)
        noise = float((followed - alone).abs().max() / scale)
        return max(0.0, leak - 4 * noise)
    finally:
        model.train(was_training)


__all__ = ["packing_leak"]
