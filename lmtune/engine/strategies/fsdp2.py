"""FSDP2 (``torch.distributed.fsdp.fully_shard``): weights, gradients and optimizer state sharded over ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtune.core.dist import is_main_process
from lmtune.core.errors import ConfigError
from lmtune.engine.strategies.base import Strategy, _local
from lmtune.model.compile import decoder_layers


class FSDP2Strategy(Strategy):
    """``torch.distributed.fsdp.fully_shard``: every decoder layer is one unit, the causal LM the root.

    Parameters, gradients and optimizer state are sharded over all ranks. A checkpoint
    holds the complete weights (gathered; convertible to Hugging Face) and one optimizer
    shard per rank.
    """

    name = "fsdp2"
    shards_params = True
    sharded_optimizer = True

    def __init__(self, device: torch.device, reshard_after_forward: bool = True) -> None:
        super().__init__(device)
        self.reshard_after_forward = reshard_after_forward

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "quantized", False):
            raise ConfigError("FSDP2 cannot shard a 4-bit quantized model: use DDP (leave --strategy out) or "
                              "DeepSpeed (--deepspeed deepspeed_zero2) for QLoRA")
        causal_lm = model._base_model() if hasattr(model, "_base_model") else model
        blocks = decoder_layers(causal_lm)
        if not blocks:
            raise ConfigError(f"FSDP2: cannot find the decoder layers of {type(causal_lm).__name__} "
                              "(its _no_split_modules is empty)")
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward)
        fully_shard(causal_lm, reshard_after_forward=self.reshard_after_forward)
        return model

    @contextlib.contextmanager
    def micro_batch(self, model: nn.Module, last: bool) -> Iterator[None]:
        roots = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
        for module in roots:
            module.set_requires_gradient_sync(last, recurse=False)
        try:
            yield
        finally:
            for module in roots:
                module.set_requires_gradient_sync(True, recurse=False)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main_process():
            return None
        return {name: value for name, value in full.items() if name in trainable}

    def optimizer_state_dict(self, optim_wrapper: Any) -> dict:
        state = optim_wrapper.state_dict()
        state["optimizer"] = _map_tensors(state["optimizer"], _local)
        state["world_size"] = self.world_size
        return state

    def load_optimizer_state_dict(self, optim_wrapper: Any, state: dict) -> None:
        saved = int(state.get("world_size", self.world_size))
        if saved != self.world_size:
            raise ConfigError(f"the checkpoint's optimizer state is sharded over {saved} processes; resume with "
                              f"{saved} processes (this run has {self.world_size}), or use load_from to start "
                              "from its weights")
        optimizer = optim_wrapper.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        inner = state["optimizer"]
        for index, values in inner["state"].items():
            param = params[int(index)]
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor

                for key, value in list(values.items()):
                    if torch.is_tensor(value) and value.dim() > 0:
                        values[key] = DTensor.from_local(value.to(param.device), param.device_mesh,
                                                         param.placements, shape=param.shape,
                                                         stride=param.stride())
        optim_wrapper.load_state_dict(state)


def _map_tensors(obj: Any, fn) -> Any:
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


__all__ = ["FSDP2Strategy"]
