"""Batching tokenized rows into model inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmtune.core.constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX


def _positions(lengths: Sequence[int]) -> list[int]:
    return [p for n in lengths for p in range(n)]


def default_collate_fn(
    instances: Sequence[dict],
    pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
    return_hf_format: bool = False,
    use_varlen_attn: bool = False,
) -> dict:
    """Right-pad rows into a batch of ``input_ids``, ``labels`` and ``position_ids``.

    Position ids restart at every sample of a packed row and at the padding, so
    no token attends across a sample boundary or into padding and no attention
    mask is needed. With ``use_varlen_attn`` the batch also carries
    ``cumulative_len`` and ``max_seqlen`` (per row) for variable-length kernels.
    ``return_hf_format`` is accepted for XTuner compatibility; the batch is
    always a flat dict of tensors.
    """
    longest = max(len(row["input_ids"]) for row in instances)
    input_ids, labels, position_ids, cumulative, max_seqlen = [], [], [], [], []
    for row in instances:
        n = len(row["input_ids"])
        lengths = list(row.get("num_tokens") or [n])
        pad = longest - n
        input_ids.append(list(row["input_ids"]) + [pad_index] * pad)
        labels.append(list(row["labels"]) + [IGNORE_INDEX] * pad)
        segments = lengths + ([pad] if pad else [])
        position_ids.append(_positions(segments))
        if use_varlen_attn:
            cumulative.append(torch.tensor([0] + segments).cumsum(0).to(torch.int32))
            max_seqlen.append(max(segments))
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }
    if use_varlen_attn:
        batch["cumulative_len"] = cumulative
        batch["max_seqlen"] = max_seqlen
    return batch


def mmlu_collate_fn(instances: Sequence[dict], pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
                    return_hf_format: bool = False) -> dict:
    """XTuner's batch of multiple-choice prompts (rows of ``input_ids_with_output=False`` data): the batch of
    ``default_collate_fn`` with an ``attention_mask`` (True on each row's own tokens), each row's answer letter
    (``answers``, its ``output`` field) and ``subjects`` (its ``subject`` field, '' when absent), which
    :class:`lmtune.engine.evaluation.MMLUMetric` reads."""
    batch = default_collate_fn(instances, pad_index)
    longest = batch["input_ids"].shape[1]
    lengths = torch.tensor([len(row["input_ids"]) for row in instances])
    batch["attention_mask"] = torch.arange(longest)[None, :] < lengths[:, None]
    batch["answers"] = [str(row.get("output", "")).strip() for row in instances]
    batch["subjects"] = [str(row.get("subject", "") or "") for row in instances]
    return batch
