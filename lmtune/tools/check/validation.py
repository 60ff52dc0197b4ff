"""The validation part of ``lmtune check``: split sizes, the interval, what a pass costs, what is watched."""

from __future__ import annotations

import math
from typing import Any

from lmtune.config.build import build, is_type_dict
from lmtune.core.errors import ConfigError
from lmtune.tools.check.report import CheckReport, Writer

# A validation batch is a forward pass alone: about a third of a training iteration's compute (forward and
# backward), a quarter with activation checkpointing (which runs the forward twice).
FORWARD_SHARE = {False: 1 / 3, True: 1 / 4}


def split_rows(ds_cfgs: list[dict], split: dict) -> tuple[int, int] | None:
    """``(held out, left to train)`` raw rows of ``val_split`` over the training datasets (None: not loadable)."""
    from lmtune.dataset.holdout import held_out_count
    from lmtune.dataset.stages import train_split

    held = total = 0
    for ds_cfg in ds_cfgs:
        try:
            raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
        except Exception:  # noqa: BLE001 - the data section reports it
            return None
        n = min(len(raw), int(ds_cfg.get("max_dataset_length") or len(raw)))
        k = held_out_count(split["size"], n)
        if k < 1 or k >= n:
            raise ConfigError(f"val_split={split['size']!r} holds out {k} of the {n} rows of "
                              f"{ds_cfg.get('dataset', {}).get('path', 'a training dataset')}: "
                              + ("raise it" if k < 1 else "lower it, none would be left to train on"))
        held, total = held + k, total + n
    return held, total - held


def check_validation(report: CheckReport, w: Writer, cfg: Any, ds_cfgs: list[dict], sample_rows, checkpointing: bool,
                     world: int, train_rows: float | None, iters_per_epoch: int | None) -> float | None:
    """Report the validation settings of ``cfg``; returns the training rows left when ``val_split`` takes some
    (else ``train_rows``). ``sample_rows(ds_cfgs)`` estimates the rows of dataset configs (the data section's)."""
    from lmtune.dataset.holdout import parse_val_split
    from lmtune.engine.runner.validation import data_configs, val_interval

    try:
        _, val_loader = data_configs(cfg)
        split = parse_val_split(cfg.get("val_split"))
    except ConfigError as exc:
        report.problems.append(str(exc))
        return train_rows
    watched = _watched(cfg)
    if val_loader is None:
        if any(name.startswith("val/") for name in watched):
            report.problems.append(f"{watched[0]!r} is watched (save_best / early_stopping) but the config has no "
                                   "validation data: add val_split, val_dataset or val_dataloader")
        return train_rows
    w.section("validation")
    val_rows: float | None = None
    if split is not None:
        try:
            sizes = split_rows(ds_cfgs, split)
        except ConfigError as exc:
            report.problems.append(str(exc))
            return train_rows
        if sizes is not None:
            held, left = sizes
            w.line(f"val_split={split['size']!r} (seed {split['seed']}): {held:,} rows held out for validation, "
                   f"{left:,} left to train on")
            if train_rows is not None:
                scale = left / max(held + left, 1)
                val_rows, train_rows = train_rows * (1 - scale), train_rows * scale
    else:
        dataset = val_loader.get("dataset") if isinstance(val_loader, dict) else None
        if is_type_dict(dataset):
            configs = [dict(d) for d in dataset["datasets"]] if "datasets" in dataset else [dict(dataset)]
            val_rows = sample_rows(configs)
    batch = int((val_loader.get("batch_size") if isinstance(val_loader, dict) else 1) or 1)
    train_cfg = dict(cfg.get("train_cfg") or {})
    hooks = dict(cfg.get("default_hooks") or {})
    checkpoint = dict(hooks.get("checkpoint") or {})
    save_steps = checkpoint.get("interval") if checkpoint.get("by_epoch") is False else None
    try:
        every = val_interval(cfg, train_cfg.get("val_interval"), save_steps if (save_steps or 0) > 0 else None,
                             iters_per_epoch or 1)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return train_rows
    if val_rows is not None:
        val_rows = math.ceil(val_rows - 1e-9) if val_rows > 0 else 0  # packed rows: a part of one is a row
        batches = math.ceil(math.ceil(val_rows / world) / batch) if val_rows else 0
        if batches == 0:
            report.problems.append("the validation data gives no rows")
            return train_rows
        cost = batches * FORWARD_SHARE[checkpointing]
        w.line(f"validation rows: ~{val_rows:,.0f}; {batches:,} batch(es) of {batch} per device")
        w.line(f"one pass: about the time of {cost:,.1f} training iteration(s) (forward only: "
               f"{FORWARD_SHARE[checkpointing]:.2f} of an iteration per batch"
               + (", activation checkpointing on" if checkpointing else "") + ")")
        w.line(f"every {every:,} iterations and at the end: about {100 * cost / every:.1f}% more training time")
    else:
        w.line(f"every {every:,} iterations and at the end")
    if watched:
        w.line("watched: " + ", ".join(watched))
    return train_rows


def _watched(cfg: Any) -> list[str]:
    names = []
    checkpoint = dict(dict(cfg.get("default_hooks") or {}).get("checkpoint") or {})
    for value in (cfg.get("save_best"), checkpoint.get("save_best")):
        if isinstance(value, str) and value != "auto":
            names.append(value)
    early = cfg.get("early_stopping")
    if isinstance(early, dict) and isinstance(early.get("monitor"), str):
        names.append(early["monitor"])
    return names
