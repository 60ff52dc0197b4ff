"""Small helpers over ``torch.distributed`` that also work when it is not initialised."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def decided_by_main_process(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 only, its result given to every rank; a ``UserError`` it raises is raised
    on every rank with the same message (so no rank waits in a collective for one that has given up)."""
    from lmtune.core.errors import UserError

    result, message = None, None
    if is_main_process():
        try:
            result = decide()
        except UserError as exc:
            message = str(exc)
    result, message = broadcast_object((result, message))
    if message:
        raise UserError(message)
    return result


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
