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


# -- sequence parallelism: ranks in groups of `size` consecutive ranks share each row (one slice each); the data
# is sharded over the groups (the data-parallel ranks). Without it every rank is its own group of one.
_SEQUENCE_PARALLEL: dict[str, Any] = {"size": 1, "group": None, "data_group": None}


def init_sequence_parallel(size: int) -> None:
    """Split the ranks into sequence-parallel groups of ``size`` consecutive ranks (rank ``r`` in group
    ``r // size``, at place ``r % size``) and data-parallel groups of the ranks at the same place. Every rank
    calls it (it creates every group, in the same order on all ranks)."""
    from lmtune.core.errors import ConfigError

    world = get_world_size()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ConfigError(f"sequence_parallel_size={size!r} must be a positive integer dividing the number of "
                          f"processes ({world})")
    group = data_group = None
    if is_distributed() and size > 1:
        rank = get_rank()
        for start in range(0, world, size):  # a group of its own even when size == world: never DDP's
            created = dist.new_group(list(range(start, start + size)))
            group = created if start <= rank < start + size else group
        for place in range(size):
            created = dist.new_group(list(range(place, world, size)))
            data_group = created if rank % size == place else data_group
    _SEQUENCE_PARALLEL.update(size=size, group=group, data_group=data_group)


def sequence_parallel_size() -> int:
    return int(_SEQUENCE_PARALLEL["size"])


def sequence_parallel_group() -> Any:
    """This rank's sequence-parallel group (None without sequence parallelism)."""
    return _SEQUENCE_PARALLEL["group"]


def sequence_parallel_rank() -> int:
    """This rank's place in its sequence-parallel group: which slice of each row it holds."""
    return get_rank() % sequence_parallel_size()


def data_parallel_rank() -> int:
    """Which share of the data this rank reads (its sequence-parallel group's number)."""
    return get_rank() // sequence_parallel_size()


def data_parallel_world_size() -> int:
    """How many shares the data is split into: the number of sequence-parallel groups."""
    return get_world_size() // sequence_parallel_size()
