"""Sequence parallelism: the sampler XTuner configs name.

lmtune shards the data by rank only. ``SequenceParallelSampler`` is therefore
``DefaultSampler``. A config with ``sequence_parallel_size`` above 1 is refused
before any work (see ``Runner``).
"""

from __future__ import annotations

from lmtune.dataset.samplers import DefaultSampler


class SequenceParallelSampler(DefaultSampler):
    """``DefaultSampler`` under XTuner's name (sequence parallel size 1: every rank is a data rank)."""


__all__ = ["SequenceParallelSampler"]
