"""Training in one process, or replicated over several with DDP: the base every strategy extends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtune.core.dist import all_reduce_sum, get_world_size, is_main_process
from lmtune.engine.optim.optimizer_wrapper import StepSettings


class Strategy:
    """One process, or DDP when the world size is above one."""

    name = "single"
    shards_params = False  # whether a rank holds only part of the weights
    sharded_optimizer = False  # whether each rank saves its own optimizer shard
    shards_at_load = False  # whether weights are sharded as they load (DeepSpeed ZeRO-3), before wrap_model

    def __init__(self, device: torch.device, find_unused_parameters: bool = False) -> None:
        self.device = device
        self.find_unused_parameters = find_unused_parameters
        self.world_size = get_world_size()
        if self.world_size > 1 and self.name == "single":
            self.name = "ddp"

    # -- building ---------------------------------------------------------
    def configure(self, micro_batch_size: int, step: StepSettings) -> None:
        """The built dataloader's batch size and the optimizer wrapper's settings, before the model exists
        (DeepSpeed fills its JSON from them)."""

    def model_config(self, model_cfg: Any) -> Any:
        """The model config to build: the user's, or a copy with what this strategy needs (never edited)."""
        return model_cfg

    def place_model(self, model: nn.Module) -> None:
        """Put the built model on this process's device (a quantized model is placed as it loads)."""
        if not getattr(model, "quantized", False):
            model.to(self.device)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids,
                                       find_unused_parameters=self.find_unused_parameters)

    def prepare(self, model: nn.Module, optim_wrapper: Any, runner: Any) -> tuple[nn.Module, Any]:
        return model, optim_wrapper

    @contextlib.contextmanager
    def micro_batch(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Gradients are synchronised across ranks on the last micro-batch of a step only."""
        if last or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():
                yield

    # -- checkpoints ------------------------------------------------------
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The complete trainable weights on rank 0 (None elsewhere); every rank must call it."""
        return getattr(model, "module", model).trainable_state_dict() if is_main_process() else None

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load weights into the model before ``wrap_model``."""
        model.load_trainable_state_dict(state)

    def optimizer_state_dict(self, optim_wrapper: Any) -> dict | None:
        """What ``optimizer.pt`` holds (rank 0), or this rank's shard when ``sharded_optimizer``."""
        return optim_wrapper.state_dict() if is_main_process() or self.sharded_optimizer else None

    def load_optimizer_state_dict(self, optim_wrapper: Any, state: dict) -> None:
        optim_wrapper.load_state_dict(state)

    def count_nonfinite(self, model: nn.Module) -> tuple[int, str | None]:
        """How many trainable tensors hold NaN/inf (summed over ranks) and the first one's name."""
        bad = [name for name, p in model.named_parameters()
               if p.requires_grad and p.numel() and not bool(torch.isfinite(_local(p.detach())).all())]
        total = int(all_reduce_sum(torch.tensor(len(bad), device=self.device)))
        return total, (bad[0] if bad else None)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


__all__ = ["Strategy"]
