"""The optimizer wrapper the training loop sees when DeepSpeed's engine owns the optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class DeepSpeedOptimWrapper:
    """``OptimWrapper``'s interface over a DeepSpeed engine.

    The engine casts the model to the training precision, reduces and clips the
    gradients and steps its (ZeRO-partitioned) optimizer; the loop's loss scaling by
    the step's token count is kept (``scale_wrt_gas=False``). DeepSpeed cannot take
    back a step in bf16/fp32, so a NaN/inf loss stops the run instead of being skipped
    (with fp16 its loss scaler skips overflowing steps itself).
    """

    def __init__(self, engine: Any, wrapper: Any) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        self.base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        self.accumulative_counts = wrapper.accumulative_counts
        self.max_nonfinite_steps = 1
        self.nonfinite_steps = 0
        self.skipped = False

    @contextlib.contextmanager
    def optim_context(self) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, loss_finite: bool = True) -> float | None:
        if not loss_finite:
            self.nonfinite_steps += 1
            self.skipped = True
            return float("nan")
        self.engine.step()
        self.skipped = bool(getattr(self.engine, "was_step_applied", lambda: True)() is False)
        norm = self.engine.get_global_grad_norm()
        self.nonfinite_steps = 0
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.param_groups]

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed optimizer state is gathered by DeepSpeedStrategy")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed optimizer state is restored by DeepSpeedStrategy")
