"""DeepSpeed JSON configs: the built-in ones by name, and lmtune's config winning over the JSON.

``--deepspeed deepspeed_zero2`` names a JSON shipped in ``lmtune/configs/deepspeed``;
any other value is a path to a JSON file. The training settings come from lmtune's
config, so a JSON can be shared between configs; they are read once, by the same code that
builds the dataloader and the optimizer wrapper (``StepSettings``):

- the built dataloader's batch size -> ``train_micro_batch_size_per_gpu``
- ``optim_wrapper.accumulative_counts`` -> ``gradient_accumulation_steps``
- ``optim_wrapper.clip_grad.max_norm`` -> ``gradient_clipping`` (0 without clipping)
- ``train_batch_size`` = micro-batch x accumulation x world size

A JSON value other than ``"auto"`` that differs is overridden with a warning. The
precision follows the hardware: with a mixed-precision ``AmpOptimWrapper``, bf16 where
the device supports it (the CPU and recent GPUs), fp16 on older GPUs; a plain
``OptimWrapper`` (or ``AmpOptimWrapper(dtype='float32')``) trains in fp32. The JSON's
``optimizer`` and ``scheduler`` sections are dropped (lmtune's ``optim_wrapper`` and ``param_scheduler`` are used).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lmtune.core.device import bf16_supported
from lmtune.core.errors import ConfigError, nearest
from lmtune.engine.optim.optimizer_wrapper import StepSettings

logger = logging.getLogger("lmtune")

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def builtin_deepspeed_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.json"))}


def load_deepspeed_json(config: Any) -> tuple[dict, str]:
    """The JSON for ``config`` (a built-in name, a path or a dict) and where it came from."""
    if isinstance(config, dict):
        return copy.deepcopy(dict(config)), "the config's dict"
    name = str(config)
    builtin = builtin_deepspeed_configs()
    path = Path(name).expanduser()
    if not path.is_file():
        if name in builtin:
            path = builtin[name]
        elif name.removesuffix(".json") in builtin:
            path = builtin[name.removesuffix(".json")]
        else:
            raise ConfigError(f"--deepspeed {name}: no such file and no built-in DeepSpeed config of that name"
                              f"{nearest(name, builtin)} (built-in: {', '.join(builtin)})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, not a {type(data).__name__}")
    return data, str(path)


def _is_auto(value: Any) -> bool:
    return value == "auto"


def zero_stage(raw: dict, source: str) -> int:
    """The ZeRO stage the JSON asks for (0 without a ``zero_optimization`` section)."""
    stage = dict(raw.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def resolve_deepspeed_config(raw: dict, source: str, micro_batch_size: int, step: StepSettings,
                             device: torch.device, world_size: int) -> dict:
    """The DeepSpeed config to run with: the JSON ``raw`` (read from ``source``) with lmtune's settings
    filled in (see the module doc)."""
    ds = copy.deepcopy(raw)

    def put(key: str, value: Any, from_key: str) -> None:
        old = raw.get(key, "auto")
        if not _is_auto(old) and old != value:
            logger.warning(f"DeepSpeed config {source}: {key}={old!r} is replaced by {value!r} from lmtune's "
                           f"config ({from_key})")
        ds[key] = value

    micro, accum = int(micro_batch_size), step.accumulative_counts
    put("train_micro_batch_size_per_gpu", micro, "train_dataloader.batch_size")
    put("gradient_accumulation_steps", accum, "optim_wrapper.accumulative_counts")
    put("gradient_clipping", float(step.max_norm or 0.0), "optim_wrapper.clip_grad.max_norm")
    put("train_batch_size", micro * accum * world_size, "batch_size x accumulative_counts x world size")

    if step.mixed_precision:
        precision = "bf16" if bf16_supported(device) else ("fp16" if device.type == "cuda" else "fp32")
    else:
        precision = "fp32"
    for key in ("bf16", "fp16"):
        section = dict(ds.get(key) or {})
        wanted = key == precision
        old = section.get("enabled", "auto")
        if not _is_auto(old) and bool(old) != wanted:
            logger.warning(f"DeepSpeed config {source}: {key}.enabled={old!r} is replaced by {wanted} "
                           f"(training runs in {precision} on {device.type})")
        section["enabled"] = wanted
        ds[key] = section

    for section in ("optimizer", "scheduler"):
        if section in ds:
            logger.warning(f"DeepSpeed config {source}: its '{section}' section is ignored; lmtune's "
                           f"{'optim_wrapper' if section == 'optimizer' else 'param_scheduler'} is used")
            del ds[section]
    zero = dict(ds.get("zero_optimization") or {})
    for key in [k for k, v in zero.items() if _is_auto(v)]:
        del zero[key]  # DeepSpeed's own default
    if zero:
        ds["zero_optimization"] = zero
    offload = any(dict(zero.get(k) or {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    if offload:
        # lmtune builds a torch optimizer; DeepSpeed would otherwise insist on its compiled CPU Adam
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)  # lmtune logs progress itself
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in ds.items() if _is_auto(v)]
    if leftover:
        raise ConfigError(f"DeepSpeed config {source}: {', '.join(leftover)} set to \"auto\", which lmtune "
                          "cannot fill in; give a value")
    return ds
