"""Learning-rate schedules in closed form, with MMEngine's arguments and semantics.

Each scheduler owns a window ``[begin, end)`` of steps (iterations, or epochs
when ``by_epoch=True`` and not converted). Inside it the lr is a closed-form
function of the step and the optimizer's initial lr, so resuming only needs
the step counter. Outside every window the lr keeps its last value.
``by_epoch=True, convert_to_iter_based=True`` bounds (fractional epochs
allowed) become iterations once the epoch length is known:
``int(bound * iters_per_epoch)``.
"""

from __future__ import annotations

import math

INF = 10**9


class _Scheduler:
    param_name = "lr"

    def __init__(self, optimizer, begin: float = 0, end: float = INF, by_epoch: bool = True,
                 convert_to_iter_based: bool = False, last_step: int = -1, verbose: bool = False,
                 epoch_length: int | None = None) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.by_epoch = by_epoch
        if by_epoch and convert_to_iter_based:
            if not epoch_length:
                raise ValueError("convert_to_iter_based needs the epoch length")
            begin = int(begin * epoch_length)
            end = end if end >= INF else int(end * epoch_length)
            self.by_epoch = False
            self._convert(epoch_length)
        self.begin, self.end = int(begin), int(end)
        for group in self.optimizer.param_groups:
            group.setdefault(f"initial_{self.param_name}", group[self.param_name])
        self.base_values = [g[f"initial_{self.param_name}"] for g in self.optimizer.param_groups]
        self.global_step = last_step + 1
        self._apply()

    def _convert(self, epoch_length: int) -> None:
        """Hook for schedulers with extra epoch-valued arguments."""

    def value(self, base: float, step: int) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        if self.begin <= self.global_step < self.end:
            for group, base in zip(self.optimizer.param_groups, self.base_values):
                group[self.param_name] = self.value(base, self.global_step - self.begin)

    def step(self) -> None:
        self.global_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "base_values": list(self.base_values)}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.base_values = list(state["base_values"])
        self._apply()


class LinearLR(_Scheduler):
    """lr = initial_lr * factor, the factor moving linearly from ``start_factor`` to ``end_factor``
    over the window (reaching ``end_factor`` at its last step)."""

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, **kwargs) -> None:
        if not 0 <= start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError("LinearLR factors must lie in [0, 1]")
        self.start_factor, self.end_factor = start_factor, end_factor
        super().__init__(optimizer, **kwargs)

    def value(self, base: float, step: int) -> float:
        total = self.end - self.begin - 1
        if total <= 0:
            return base * self.start_factor
        frac = min(step, total) / total
        return base * (self.start_factor + (self.end_factor - self.start_factor) * frac)


class CosineAnnealingLR(_Scheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * step / T_max)) / 2; ``T_max`` defaults
    to the window length. ``eta_min_ratio`` sets eta_min relative to the initial lr."""

    def __init__(self, optimizer, T_max: float | None = None, eta_min: float | None = None,
                 eta_min_ratio: float | None = None, **kwargs) -> None:
        if eta_min is not None and eta_min_ratio is not None:
            raise ValueError("set either eta_min or eta_min_ratio, not both")
        self.T_max = T_max
        self.eta_min = eta_min if eta_min is not None or eta_min_ratio is not None else 0.0
        self.eta_min_ratio = eta_min_ratio
        super().__init__(optimizer, **kwargs)
        if self.T_max is None:
            self.T_max = self.end - self.begin

    def _convert(self, epoch_length: int) -> None:
        if self.T_max is not None:
            self.T_max = self.T_max * epoch_length

    def value(self, base: float, step: int) -> float:
        t_max = self.T_max if self.T_max is not None else self.end - self.begin
        low = self.eta_min if self.eta_min_ratio is None else base * self.eta_min_ratio
        return low + (base - low) * (1 + math.cos(math.pi * step / max(t_max, 1))) / 2


class ConstantLR(_Scheduler):
    """lr = initial_lr * ``factor`` inside the window, initial_lr after it."""

    def __init__(self, optimizer, factor: float = 1.0 / 3, **kwargs) -> None:
        self.factor = factor
        super().__init__(optimizer, **kwargs)

    def value(self, base: float, step: int) -> float:
        return base * self.factor if step < self.end - self.begin - 1 else base

