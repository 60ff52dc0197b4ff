"""Samplers: which rows each rank reads, in which order, resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Sampler

from lmtune.core.dist import data_parallel_rank, data_parallel_world_size
from lmtune.core.errors import ConfigError


class DefaultSampler(Sampler[int]):
    """Shuffled (or ordered) indices, sharded across ranks, repeatable by seed and epoch.

    The order of epoch ``e`` depends only on ``seed`` and ``e``. Every rank gets
    the same number of indices (the list is padded by wrapping around, unless
    ``round_up=False``). ``set_epoch`` is called by ``DistSamplerSeedHook``;
    ``skip`` lets a resumed run start mid-epoch without reading skipped rows.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int | None = None,
                 round_up: bool = True) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = 0 if seed is None else int(seed)
        self.round_up = round_up
        # the data-parallel rank: the ranks of one sequence-parallel group read the same rows
        self.rank = data_parallel_rank()
        self.world_size = data_parallel_world_size()
        self.epoch = 0
        self._skip = 0
        if round_up:
            self.num_samples = math.ceil(len(dataset) / self.world_size)
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = max(0, math.ceil((len(dataset) - self.rank) / self.world_size))
            self.total_size = len(dataset)

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        if self.round_up and indices:
            indices = (indices * math.ceil(self.total_size / n))[: self.total_size]
        return indices[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()[self._skip :]
        self._skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, num_indices: int) -> None:
        """Make the next iteration start after its first ``num_indices`` indices."""
        self._skip = num_indices


class InternRepoSampler(DefaultSampler):
    """XTuner's sampler for InternLM-repo (packed) datasets: the order XTuner and InternLM train in.

    Epoch ``e`` visits the rows in the order of ``numpy.random.RandomState(seed + e)``'s
    permutation; the last ``len(dataset) % world_size`` rows of that order are left out
    (every rank gets ``len(dataset) // world_size`` rows, no row is repeated), and rank
    ``r`` takes every ``world_size``-th row starting at ``r``. ``seed`` defaults to 1024,
    the seed XTuner always uses; unlike XTuner another seed given here is honoured.
    ``set_epoch`` and ``skip`` work as in :class:`DefaultSampler`, so a run resumes mid-epoch.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int | None = None) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=1024 if seed is None else seed, round_up=False)
        self.num_samples = len(dataset) // self.world_size
        self.total_size = self.num_samples * self.world_size
        if len(dataset) and not self.num_samples:
            raise ConfigError(f"InternRepoSampler: the dataset has {len(dataset)} rows, fewer than the "
                              f"{self.world_size} ranks; every rank needs at least one")

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.RandomState(self.seed + self.epoch).permutation(n).tolist()
        else:
            order = list(range(n))
        return order[self.rank : self.total_size : self.world_size]


InternlmRepoSampler = InternRepoSampler  # XTuner's older (deprecated) name
