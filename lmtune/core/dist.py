"""Small helpers over ``torch.distributed`` that also work when it is not initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in a single process)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank ``src``'s ``value`` on every rank (the value itself in a single process)."""
    if is_distributed():
        box = [value]
        dist.broadcast_object_list(box, src=src)
        value = box[0]
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is managed as shards over ranks: an FSDP2 DTensor or a DeepSpeed ZeRO-3 parameter.

    Its full value is then only there inside its module's own call (the engine gathers it around the
    call), so code that reads a weight directly must call the module instead. The one place that knows
    the engines' marks; the strategies and the model both ask here.
    """
    if hasattr(tensor, "ds_id") or hasattr(tensor, "ds_tensor"):
        return True
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")
