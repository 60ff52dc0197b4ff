"""Several datasets in one run, each processed with its own map function."""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config.build import build


class ConcatDataset(torch.utils.data.ConcatDataset):
    """Rows of every dataset in ``datasets``, one after another (the sampler shuffles them).

    Each entry is a built dataset or a config dict such as
    ``dict(type=process_hf_dataset, dataset=..., dataset_map_fn=alpaca_map_fn, ...)``.
    Rows of unpacked datasets get ``num_tokens`` too, so packed and unpacked
    parts can be mixed in one batch.
    """

    def __init__(self, datasets: list[Any]) -> None:
        built = [build(d, key=f"train_dataset.datasets.{i}") for i, d in enumerate(datasets)]
        super().__init__(built)

    @property
    def column_names(self) -> list[str]:
        names: list[str] = []
        for dataset in self.datasets:
            for name in getattr(dataset, "column_names", []):
                if name not in names:
                    names.append(name)
        return names

    def __getitem__(self, index: int) -> dict:
        row = dict(super().__getitem__(index))
        row.setdefault("num_tokens", [len(row["input_ids"])])
        return row
