"""A validation split held out of the training rows (``val_split``): seeded, disjoint, cached with the data.

``val_split = 0.01`` (a fraction of the rows), ``= 200`` (a number of rows) or ``= dict(size=0.01, seed=0)``.
The rows are drawn from the dataset's raw rows (after ``max_dataset_length``, before tokenizing and packing) by a
permutation of ``seed`` (0 unless given: the split does not change with the run's seed), so the training part
and the validation part never share a row, and each is processed (packed, cached) on its own.
"""

from __future__ import annotations

from typing import Any

from lmtune.core.errors import ConfigError

PARTS = ("train", "val")
HOLDOUT_KEY = "holdout"  # the argument of the dataset builders that can hold rows out


def parse_val_split(value: Any) -> dict | None:
    """``{"size": float | int, "seed": int}`` of a ``val_split`` setting (None: no split), checked."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"size", "seed"}
        if unknown or "size" not in value:
            raise ConfigError(f"val_split: a dict takes size= (a fraction or a number of rows) and seed=, got "
                              f"{dict(value)!r}")
        size, seed = value["size"], value.get("seed", 0)
    else:
        size, seed = value, 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"val_split seed must be an integer, got {seed!r}")
    fraction = isinstance(size, float) and 0.0 < size < 1.0
    count = isinstance(size, int) and not isinstance(size, bool) and size >= 1
    if not (fraction or count):
        raise ConfigError(f"val_split must be a fraction of the rows (0 < val_split < 1) or a number of rows "
                          f"(an integer >= 1), got {size!r}")
    return {"size": size, "seed": seed}


def held_out_count(size: float | int, rows: int) -> int:
    """How many of ``rows`` raw rows a ``val_split`` of ``size`` (a fraction or a count) holds out."""
    return int(round(size * rows)) if isinstance(size, float) else int(size)


def holdout_rows(dataset: Any, holdout: dict, source: str) -> Any:
    """The ``holdout['part']`` rows of ``dataset`` (a ``datasets.Dataset``) under the split ``holdout`` describes."""
    import numpy as np

    n = len(dataset)
    size = holdout["size"]
    k = held_out_count(size, n)
    if k < 1:
        raise ConfigError(f"val_split={size!r} selects 0 of the {n} rows of {source}: raise it (a number of rows "
                          "such as val_split=100 also works)")
    if k >= n:
        raise ConfigError(f"val_split={size!r} would take all {n} rows of {source} for validation, leaving none to "
                          "train on: lower it")
    order = np.random.default_rng(int(holdout.get("seed", 0))).permutation(n)
    chosen = order[:k] if holdout["part"] == "val" else order[k:]
    return dataset.select(np.sort(chosen))


def with_holdout(dataset_cfg: Any, split: dict, part: str) -> Any:
    """The dataset config ``dataset_cfg`` restricted to ``part`` ('train' or 'val') of ``split``: its builder gets
    ``holdout=``; a ConcatDataset's datasets each do."""
    from lmtune.config.build import resolve_callable

    if part not in PARTS:
        raise ValueError(part)
    if not isinstance(dataset_cfg, dict) or "type" not in dataset_cfg:
        raise ConfigError("val_split needs train_dataloader.dataset to be a config dict (dict(type=process_hf_dataset, "
                          "...)); give the validation data as val_dataset = dict(...) instead")
    fn = resolve_callable(dataset_cfg["type"], "train_dataloader.dataset")
    if "datasets" in dataset_cfg and HOLDOUT_KEY not in _parameters(fn):
        return {**dataset_cfg, "datasets": [with_holdout(d, split, part) for d in dataset_cfg["datasets"]]}
    if HOLDOUT_KEY not in _parameters(fn):
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(f"val_split: {name} cannot hold out validation rows (it takes no holdout argument); use "
                          "process_hf_dataset or build_preference_dataset, or give val_dataset = dict(...)")
    return {**dataset_cfg, HOLDOUT_KEY: {**split, "part": part}}


def _parameters(fn: Any) -> set[str]:
    import inspect

    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()
