"""Packing whole samples into rows of at most ``max_length`` tokens.

Samples are never split. Each packed row records its samples' lengths
(``num_tokens``), from which the collate function restarts position ids per
sample; the attention then keeps every sample to itself, so a packed batch has
exactly the loss of the same samples run one by one. The first label of every
sample is ignored: in an unpacked row it is never predicted (there is no token
before it), and in a packed row it must not be predicted from the previous sample.
"""

from __future__ import annotations

import bisect

from lmtune.core.constants import IGNORE_INDEX


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: lists of sample indices, each list fitting ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        need = lengths[i]
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (space - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def pack_batch(batch: dict, max_length: int) -> dict:
    """A ``datasets.map(batched=True)`` function packing a batch of encoded samples."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "length": []}
    for members in best_fit_bins(lengths, max_length):
        members.sort()
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += batch["input_ids"][i]
            labels += [IGNORE_INDEX] + list(batch["labels"][i][1:])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_tokens"].append([lengths[i] for i in members])
        out["length"].append(len(ids))
    return out


def concat_cut_batch(batch: dict, max_length: int) -> dict:
    """XTuner's packing: concatenate samples in order and cut every ``max_length`` tokens.

    Fills rows completely but splits samples across rows. Each piece is its own
    segment (positions restart, it attends only to itself), and a piece's first
    label is ignored like every segment start. The tail shorter than
    ``max_length`` is kept as a last, shorter row.
    """
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "length": []}
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []

    def flush() -> None:
        out["input_ids"].append(ids[:])
        out["labels"].append(labels[:])
        out["num_tokens"].append(segments[:])
        out["length"].append(len(ids))
        ids.clear(), labels.clear(), segments.clear()

    for sample_ids, sample_labels in zip(batch["input_ids"], batch["labels"]):
        start = 0
        while start < len(sample_ids):
            take = min(len(sample_ids) - start, max_length - len(ids))
            piece = list(sample_labels[start:start + take])
            ids.extend(sample_ids[start:start + take])
            labels.extend([IGNORE_INDEX] + piece[1:])
            segments.append(take)
            start += take
            if len(ids) == max_length:
                flush()
    if ids:
        flush()
    return out


PACKERS = {"best_fit": pack_batch, "concat": concat_cut_batch}
