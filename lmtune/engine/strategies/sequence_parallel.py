"""Sequence parallelism (DeepSpeed-Ulysses): the ranks of a sequence-parallel group share each row of a batch.

Each row is padded to a multiple of the group's size (pad tokens in a sample of their own, never trained),
its next-token targets are taken on the whole row, and rank ``r`` of the group keeps the ``r``-th contiguous
slice of its tokens, positions and targets. The attention of every layer reaches the whole row through the
Ulysses exchange (``lmtune.model.ulysses``) with the whole rows' sample bounds, so each sample still attends only
to itself. Each rank's loss is its slice's; the loop's normalisation (the step's target tokens summed over all
ranks) and the gradient averaging over all ranks then give the gradient of the single-process step.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.core.constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX
from lmtune.core.dist import sequence_parallel_group, sequence_parallel_rank, sequence_parallel_size
from lmtune.core.errors import ConfigError
from lmtune.model.loss import shifted_targets
from lmtune.model.packed_attention import SEQUENCE_PARALLEL_KWARG, segment_bounds

# what a batch may hold besides its tokens: anything else (attention masks, preference sequence indices) would
# describe the whole row
SHARDABLE = {"input_ids", "labels", "position_ids"}
# the variable-length attention arguments of ``default_collate_fn(use_varlen_attn=True)``: they describe the whole
# rows' samples, which the whole rows' positions describe too (the slices' attention gets its sample bounds from
# those), so they are dropped
WHOLE_ROW_VARLEN = {"cumulative_len", "max_seqlen"}


def shard_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """This rank's slice of every row of ``batch`` (the batch itself without sequence parallelism)."""
    size = sequence_parallel_size()
    if size == 1:
        return batch
    extra = sorted(k for k, v in batch.items() if k not in SHARDABLE | WHOLE_ROW_VARLEN and v is not None)
    if extra:
        raise ConfigError(f"sequence parallelism splits batches of input_ids, labels and position_ids; this batch "
                          f"also holds {extra} (use default_collate_fn)")
    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, length)
    pad = -length % size
    if pad:  # a padding sample of its own: positions restart, nothing trained
        ids = torch.cat([ids, ids.new_full((rows, pad), DEFAULT_PAD_TOKEN_INDEX)], dim=1)
        labels = torch.cat([labels, labels.new_full((rows, pad), IGNORE_INDEX)], dim=1)
        positions = torch.cat([positions, torch.arange(pad, device=ids.device).expand(rows, pad)], dim=1)
    targets = shifted_targets(labels)  # on the whole row: a slice's last token predicts the next slice's first
    width = ids.shape[1] // size
    part = slice(sequence_parallel_rank() * width, (sequence_parallel_rank() + 1) * width)
    return {"input_ids": ids[:, part], "position_ids": positions[:, part], "targets": targets[:, part],
            SEQUENCE_PARALLEL_KWARG: {"group": sequence_parallel_group(), "bounds": segment_bounds(positions)}}


def check_sequence_parallel(model: Any) -> None:
    """What sequence parallelism runs with: supervised fine-tuning of a model on lmtune's packed attention
    (transformers' sdpa; ``use_varlen_attn`` too, which then runs on it), under DDP, FSDP2 or DeepSpeed ZeRO-1/2/3.
    The gradients of all ranks are averaged by each of them alike (every rank is a data-parallel rank to the
    engine; the loop's normalisation counts the target tokens of all ranks)."""
    from lmtune.model.sft import SupervisedFinetune

    size = sequence_parallel_size()
    if size == 1:
        return
    if type(model) is not SupervisedFinetune:
        raise ConfigError(f"sequence_parallel_size={size}: lmtune splits sequences for supervised fine-tuning "
                          f"(SupervisedFinetune) only so far, not {type(model).__name__}")
    if not getattr(model, "packed_sdpa", False):
        raise ConfigError(f"sequence_parallel_size={size} needs the model's attention on lmtune's packed SDPA "
                          "(attn_implementation 'sdpa'); this model's attention "
                          f"({getattr(getattr(model.llm, 'config', None), '_attn_implementation', '?')}) "
                          "cannot take a slice of the sequence")
