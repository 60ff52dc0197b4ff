"""Sequence parallelism: the sampler XTuner configs name.

lmtune's ``DefaultSampler`` already shards the data by the data-parallel rank (the ranks of a sequence-parallel
group read the same rows, each keeps its slice of them: ``lmtune.engine.strategies.sequence_parallel``), so
``SequenceParallelSampler`` is ``DefaultSampler`` under XTuner's name.
"""

from __future__ import annotations

from lmtune.dataset.samplers import DefaultSampler


class SequenceParallelSampler(DefaultSampler):
    """``DefaultSampler`` under XTuner's name: the rows are sharded over the data-parallel ranks."""


__all__ = ["SequenceParallelSampler"]
