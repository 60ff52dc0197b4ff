"""Token-level cross-entropy for causal language modelling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.utils.constants import IGNORE_INDEX


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
