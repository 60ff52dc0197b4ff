"""Building the parts of a run from their config: dataloader, optimizer wrapper, schedulers, hooks."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from lmtune.config import ConfigError, build
from lmtune.config.build import check_kwargs, resolve_callable
from lmtune.core.hook import Hook, priority_value
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.samplers import DefaultSampler
from lmtune.engine.checkpoint.hook import CheckpointHook
from lmtune.engine.hooks import DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from lmtune.engine.optim import OptimWrapper

logger = logging.getLogger("lmtune")

DEFAULT_HOOKS = {
    "timer": dict(type=IterTimerHook),
    "logger": dict(type=LoggerHook, interval=10),
    "param_scheduler": dict(type=ParamSchedulerHook),
    "checkpoint": dict(type=CheckpointHook, interval=1),
    "sampler_seed": dict(type=DistSamplerSeedHook),
}


# Hyperparameters of torch's optimizers; one the chosen optimizer lacks is dropped, not an error.
OPTIMIZER_HPARAMS = {"betas", "eps", "momentum", "dampening", "nesterov", "amsgrad", "alpha", "centered",
                     "rho", "lr_decay", "initial_accumulator_value", "momentum_decay", "decoupled_weight_decay",
                     "lambd", "t0", "etas", "step_sizes"}


def build_dataloader(cfg: Any, seed: int, device: torch.device, mp_start_method: str | None = None,
                     key: str = "train_dataloader") -> DataLoader:
    """The dataloader of ``cfg`` (a DataLoader, or its config); its sampler is seeded with ``seed``.

    ``key`` 'val_dataloader': every rank reads its own share of the rows once, in order, none repeated or
    dropped (``DefaultSampler(shuffle=False, round_up=False)`` whatever sampler the config names, and
    ``drop_last=False``), so a sum over the split counts each row once."""
    if cfg is None:
        raise ConfigError(f"the config has no {key}")
    if isinstance(cfg, DataLoader):
        return cfg
    cfg = dict(cfg)
    if "dataset" not in cfg:
        raise ConfigError(f"{key} has no dataset")
    dataset = build(cfg.pop("dataset"), key=f"{key}.dataset")
    sampler_cfg = cfg.pop("sampler", None) or dict(type=DefaultSampler, shuffle=True)
    if key == "val_dataloader":
        sampler_cfg = dict(type=DefaultSampler, shuffle=False, round_up=False)
        cfg.pop("batch_sampler", None)
        cfg["drop_last"] = False
    sampler = build(sampler_cfg, key=f"{key}.sampler", dataset=dataset, seed=seed)
    collate_cfg = cfg.pop("collate_fn", None) or dict(type=default_collate_fn)
    collate = collate_cfg
    if isinstance(collate_cfg, dict):
        collate_cfg = dict(collate_cfg)
        fn = resolve_callable(collate_cfg.pop("type"), f"{key}.collate_fn")
        check_kwargs(fn, collate_cfg, f"{key}.collate_fn")
        collate = partial(fn, **collate_cfg)
    batch_sampler = cfg.pop("batch_sampler", None)
    if batch_sampler is not None:  # MMEngine style: batch_sampler=dict(type=BatchSampler, batch_size=...)
        bs_cfg = dict(batch_sampler) if isinstance(batch_sampler, dict) else batch_sampler
        if isinstance(bs_cfg, dict):
            bs_cfg.setdefault("batch_size", cfg.get("batch_size", 1))
            bs_cfg.setdefault("drop_last", bool(cfg.get("drop_last", False)))
            batch_sampler = build(bs_cfg, key=f"{key}.batch_sampler", sampler=sampler)
        for key in ("batch_size", "shuffle", "drop_last"):
            cfg.pop(key, None)
    workers = int(cfg.get("num_workers", 0))
    if not workers:
        cfg.pop("persistent_workers", None)
    elif mp_start_method:
        cfg.setdefault("multiprocessing_context", mp_start_method)
    cfg.setdefault("pin_memory", device.type == "cuda")
    generator = torch.Generator()
    generator.manual_seed(seed)
    check_kwargs(DataLoader.__init__, cfg, key)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, generator=generator, **cfg)
    return DataLoader(dataset, sampler=sampler, collate_fn=collate, generator=generator, **cfg)


def build_optim_wrapper(cfg: Any, params: list) -> OptimWrapper:
    """The optimizer wrapper of ``optim_wrapper`` over the trainable ``params``."""
    if cfg is None:
        raise ConfigError("the config has no optim_wrapper")
    cfg = dict(cfg)
    cfg.setdefault("type", OptimWrapper)
    if "optimizer" not in cfg:
        raise ConfigError("optim_wrapper has no optimizer")
    optimizer_cfg = drop_foreign_hparams(cfg.pop("optimizer"))
    optimizer = build(optimizer_cfg, key="optim_wrapper.optimizer", params=params)
    return build(cfg, key="optim_wrapper", optimizer=optimizer)


def drop_foreign_hparams(cfg: Any) -> Any:
    """Switching ``optim_type`` (say AdamW -> SGD) keeps working: hyperparameters of other
    torch optimizers that the chosen one lacks (``betas`` for SGD) are dropped with a warning.
    Any other unknown argument is still an error."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        return cfg
    fn = resolve_callable(cfg["type"], "optim_wrapper.optimizer")
    cfg = dict(cfg)
    for name in sorted(set(cfg) & OPTIMIZER_HPARAMS):
        try:
            check_kwargs(fn, {name: None}, None)
        except ConfigError:
            logger.warning(f"optim_wrapper.optimizer.{name} is ignored: "
                           f"{getattr(fn, '__name__', fn)} has no such hyperparameter")
            del cfg[name]
    return cfg


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_optimizer_and_schedule(optim_cfg: Any, scheduler_cfg: Any) -> None:
    """The optimizer's learning rate and the schedules' windows, checked before anything is built: torch
    takes ``lr=True`` for 1.0, and a window that ends before it begins would leave the lr untouched."""
    optimizer = dict(optim_cfg or {}).get("optimizer")
    if isinstance(optimizer, dict) and "lr" in optimizer:
        lr = optimizer["lr"]
        if not isinstance(lr, torch.Tensor) and (not _is_number(lr) or lr < 0):
            raise ConfigError(f"optim_wrapper.optimizer.lr must be a non-negative number (the lr setting), "
                              f"got {lr!r}")
    cfgs = [] if scheduler_cfg is None else [scheduler_cfg] if isinstance(scheduler_cfg, dict) else list(scheduler_cfg)
    for i, sched in enumerate(cfgs):
        if not isinstance(sched, dict):
            continue
        begin, end = sched.get("begin", 0), sched.get("end")
        for name, value in (("begin", begin), ("end", end)):
            if value is not None and not _is_number(value):
                raise ConfigError(f"param_scheduler.{i}.{name} must be a number, got {value!r}")
        if end is not None and begin > end:
            raise ConfigError(f"param_scheduler.{i} ({getattr(sched.get('type'), '__name__', sched.get('type'))}) "
                              f"begins at {begin} but ends at {end}: its window is empty (check warmup_ratio and "
                              "max_epochs)")


def build_schedulers(cfg: Any, optim_wrapper: Any, epoch_length: int) -> list:
    """The learning-rate schedulers of ``param_scheduler`` (epoch bounds converted with ``epoch_length``)."""
    if cfg is None:
        return []
    cfgs = [cfg] if isinstance(cfg, dict) else list(cfg)
    return [build(c, key=f"param_scheduler.{i}", optimizer=optim_wrapper, epoch_length=epoch_length)
            for i, c in enumerate(cfgs)]


def build_hooks(default_hooks: Any, custom_hooks: Any, device: Any = None) -> list[Hook]:
    """The hooks of ``default_hooks`` (over lmtune's defaults) and ``custom_hooks``, in priority order.

    On a GPU whose peak FLOP/s is known, a ``ThroughputHook`` is added when the config has none, so
    every log line carries TFLOP/s and MFU."""
    merged = dict(DEFAULT_HOOKS)
    merged.update(dict(default_hooks or {}))
    cfgs = [(f"default_hooks.{name}", c) for name, c in merged.items() if c is not None]
    cfgs += [(f"custom_hooks.{i}", c) for i, c in enumerate(custom_hooks or [])]
    hooks = []
    for key, hook_cfg in cfgs:
        priority = None
        if isinstance(hook_cfg, dict):
            hook_cfg = dict(hook_cfg)
            priority = hook_cfg.pop("priority", None)
        hook = build(hook_cfg, key=key)
        if priority is not None:
            hook.priority = priority
        hooks.append(hook)
    from lmtune.engine.hooks.throughput import ThroughputHook, gpu_peak_tflops

    if (device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
            and gpu_peak_tflops(torch.cuda.get_device_name(device))
            and not any(isinstance(h, ThroughputHook) for h in hooks)):
        hooks.append(ThroughputHook())
    return sorted(hooks, key=lambda h: priority_value(h.priority))


__all__ = ["DEFAULT_HOOKS", "build_dataloader", "build_hooks", "build_optim_wrapper", "build_schedulers",
           "check_optimizer_and_schedule"]
