"""Optimizer wrappers: mixed precision, gradient accumulation bookkeeping, clipping."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch

from lmtune.core.device import default_device, training_dtype
from lmtune.core.errors import ConfigError


def check_accumulative_counts(value: Any) -> int:
    """``accumulative_counts`` as the loop uses it: a positive integer, or one clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"optim_wrapper.accumulative_counts must be a positive integer (micro-batches per "
                          f"optimizer step), got {value!r}")
    return value


def check_clip_grad(clip_grad: Any) -> dict | None:
    """``clip_grad`` as the wrapper uses it: None, or a dict whose ``max_norm`` is a positive number."""
    if not clip_grad:
        return None
    if not isinstance(clip_grad, dict):
        raise ConfigError(f"optim_wrapper.clip_grad must be a dict such as dict(max_norm=1.0), got {clip_grad!r}")
    max_norm = clip_grad.get("max_norm")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ConfigError(f"clip_grad.max_norm must be a positive number, got {max_norm!r}")
    return dict(clip_grad)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What an optimizer step is, read once from the ``optim_wrapper`` config with the wrapper's own checks:
    for the parts that need it before the wrapper exists (DeepSpeed's JSON, ``lmtune check``)."""

    accumulative_counts: int = 1
    max_norm: float | None = None
    mixed_precision: bool = False  # an AmpOptimWrapper whose dtype is not float32

    @classmethod
    def from_config(cls, optim_cfg: Any) -> StepSettings:
        optim = dict(optim_cfg or {})
        clip = check_clip_grad(optim.get("clip_grad"))
        kind = optim.get("type")
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
        dtype = optim.get("dtype")
        full = dtype in ("float32", "fp32", torch.float32) or str(dtype) == "torch.float32"
        return cls(accumulative_counts=check_accumulative_counts(optim.get("accumulative_counts", 1)),
                   max_norm=None if clip is None else float(clip["max_norm"]),
                   mixed_precision="Amp" in str(name) and not full)


class OptimWrapper:
    """Wraps a ``torch.optim`` optimizer for the training loop.

    The loop groups ``accumulative_counts`` micro-batches into one optimizer
    step and scales each micro-batch loss by the step's total number of target
    tokens, so the step's gradient is that of the mean over all its tokens.
    ``clip_grad=dict(max_norm=..., norm_type=2, error_if_nonfinite=False)``
    clips the total gradient norm before the step.

    A step whose loss or gradient norm is NaN or inf is skipped: no optimizer
    step, gradients zeroed (``skipped`` is True after it). ``max_nonfinite_steps``
    (default 5, ``optim_wrapper.max_nonfinite_steps`` in a config) is how many
    such steps in a row the training loop tolerates before it stops the run; a
    finite step resets the count (``nonfinite_steps``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulative_counts: int = 1,
                 clip_grad: dict | None = None, max_nonfinite_steps: int = 5) -> None:
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) \
                or max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be a positive integer, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0
        self.skipped = False
        self.optimizer = optimizer
        self.accumulative_counts = check_accumulative_counts(accumulative_counts)
        self.clip_grad = check_clip_grad(clip_grad)
        self.device = default_device()

    # -- the step ---------------------------------------------------------
    @contextlib.contextmanager
    def optim_context(self) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _unscale(self) -> None:
        pass

    def clip_grads(self) -> float | None:
        """Clip (when configured) and return the total gradient norm."""
        self._unscale()
        params = self._params()
        if not params:
            return None
        if self.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, **self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients, summed over ranks
            norm = norm.full_tensor()
        return float(norm)

    def _optimizer_step(self) -> None:
        self.optimizer.step()

    def _skips_overflow_itself(self) -> bool:
        """Whether a loss scaler already handles non-finite gradients (by skipping and backing off)."""
        return False

    def step(self, loss_finite: bool = True) -> float | None:
        """Unscale, clip, step and zero the gradients; return the gradient norm.

        With a non-finite loss (``loss_finite=False``) or gradient norm the optimizer step is skipped.
        """
        grad_norm = self.clip_grads()
        grad_finite = grad_norm is None or math.isfinite(grad_norm)
        self.skipped = not loss_finite or (not grad_finite and not self._skips_overflow_itself())
        if self.skipped:
            self.nonfinite_steps += 1
            self._after_step()  # a loss scaler that unscaled this step resets (and backs off) here
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.nonfinite_steps = 0
        self._optimizer_step()
        self._after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _after_step(self) -> None:
        pass

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class AmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` with ``torch.amp`` autocast and, for fp16, a gradient scaler.

    ``dtype`` is 'float16' or 'bfloat16' (fp16 on a CPU becomes bf16, with a
    warning). ``loss_scale`` is 'dynamic', a number (a static scale) or a dict
    of ``torch.amp.GradScaler`` arguments; it only applies to fp16. Steps whose
    gradients overflow in fp16 are skipped by the scaler.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulative_counts: int = 1,
                 clip_grad: dict | None = None, loss_scale: Any = "dynamic", dtype: Any = None,
                 use_fsdp: bool = False, max_nonfinite_steps: int = 5) -> None:
        super().__init__(optimizer, accumulative_counts, clip_grad, max_nonfinite_steps)
        self.dtype = training_dtype(dtype, self.device)
        self.scaler = None
        if self.dtype == torch.float16:
            if loss_scale == "dynamic":
                kwargs: dict = {}
            elif isinstance(loss_scale, dict):
                kwargs = dict(loss_scale)
            else:
                kwargs = {"init_scale": float(loss_scale), "growth_interval": 2**62, "backoff_factor": 1.0,
                          "growth_factor": 1.0}
            self.scaler = torch.amp.GradScaler(self.device.type, **kwargs)

    @contextlib.contextmanager
    def optim_context(self) -> Iterator[None]:
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def _skips_overflow_itself(self) -> bool:
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()

    def _after_step(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
