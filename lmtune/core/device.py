"""Which device and which training dtype this process uses."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("lmtune")
_warned: set[str] = set()

_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def as_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _NAMES:
        return _NAMES[value.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {value!r}; use 'float16', 'bfloat16' or 'float32'")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def training_dtype(requested, device: torch.device) -> torch.dtype:
    """The half-precision dtype to train in on ``device``, given the config's wish.

    fp16 is no training dtype for a CPU: it falls back to bf16 there (one
    warning). A GPU without bf16 falls back to fp16. fp32 stays fp32.
    """
    dtype = as_dtype(requested) or torch.float16
    if dtype == torch.float16 and device.type == "cpu":
        warn_once("float16 is not a training dtype on the CPU: using bfloat16 instead.")
        return torch.bfloat16
    if dtype == torch.bfloat16 and not bf16_supported(device):
        warn_once(f"{device} does not support bfloat16: using float16 instead.")
        return torch.float16
    return dtype
