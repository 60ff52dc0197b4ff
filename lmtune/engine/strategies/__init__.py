"""How the model is spread over processes: one process, DDP, FSDP2 or DeepSpeed ZeRO.

A strategy is chosen by the launch command, not the config (``--deepspeed NAME``,
``--strategy fsdp2``, or several processes for DDP); ``strategy=dict(type='fsdp2')``
in a config works too. The runner asks the strategy to

- ``configure`` itself from the built dataloader and the optimizer wrapper's settings, give the
  ``model_config`` to build (a copy where it needs a change) and ``place_model`` on the device;
- ``wrap_model`` before the optimizer exists (DDP, FSDP2 sharding);
- ``prepare`` the model and optimizer wrapper together (DeepSpeed's engine);
- open each micro-batch with ``micro_batch`` (no gradient sync before the last one);
- gather the trainable weights and the optimizer state for a checkpoint, and put
  them back on resume. Every rank takes part in gathering; rank 0 writes.

Checkpoints keep one layout under every strategy: ``model.safetensors`` with the
complete trainable weights (fp32 masters where training keeps them), so resume,
``lmtune convert`` and ``load_from`` work whatever the engine was. The optimizer
state is one consolidated ``optimizer.pt`` (single process, DDP, DeepSpeed) or,
under FSDP2, one shard per rank (``optimizer.rank<R>.pt``), resumable with the
same number of processes.

Modules: ``base`` (single process and DDP), ``fsdp2``, ``deepspeed`` with its ``deepspeed_config``
and ``deepspeed_wrapper``, and ``launch`` (torchrun / Slurm re-launch, process groups). Whether a
tensor is only a shard is answered by ``lmtune.core.dist.is_sharded``, for the model's code too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmtune.core.dist import get_world_size, is_sharded
from lmtune.core.errors import ConfigError
from lmtune.engine.strategies.base import Strategy
from lmtune.engine.strategies.deepspeed import DeepSpeedStrategy
from lmtune.engine.strategies.fsdp2 import FSDP2Strategy

logger = logging.getLogger("lmtune")

STRATEGIES = ("ddp", "fsdp2", "deepspeed")


def choose_strategy(cfg: Any, strategy: Any = None, deepspeed: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The engine's name (None: single process or DDP) and its options: ``--deepspeed`` / ``--strategy``
    first, then the config's ``strategy`` (a name or ``dict(type=NAME, **options)``)."""
    options: dict[str, Any] = {}
    chosen = strategy if strategy is not None else cfg.get("strategy")
    if isinstance(chosen, dict):
        options = dict(chosen)
        chosen = options.pop("type", None)
    if deepspeed is not None:
        if chosen not in (None, "deepspeed"):
            raise ConfigError(f"--deepspeed and strategy {chosen!r} exclude each other; choose one")
        chosen = "deepspeed"
        options["config"] = deepspeed
    if chosen not in (None, *STRATEGIES):
        raise ConfigError(f"unknown strategy {chosen!r}; choose one of {', '.join(STRATEGIES)}")
    if chosen == "deepspeed" and "config" not in options:
        raise ConfigError("strategy deepspeed needs config=NAME or a JSON path (or use --deepspeed NAME)")
    return chosen, options


def build_strategy(cfg: Any, device: torch.device, strategy: Any = None, deepspeed: str | None = None) -> Strategy:
    """The strategy for this run (see ``choose_strategy``)."""
    chosen, options = choose_strategy(cfg, strategy, deepspeed)
    if chosen in ("fsdp2", "deepspeed"):
        from lmtune.engine.strategies.launch import init_single_process

        init_single_process()  # both engines need a process group, also of one process
    if chosen == "fsdp2" and get_world_size() == 1:
        logger.info("FSDP2 with one process: nothing to shard; training as usual")
    kind = {"deepspeed": DeepSpeedStrategy, "fsdp2": FSDP2Strategy}.get(chosen, Strategy)
    try:
        return kind(device, **options)
    except TypeError as exc:
        raise ConfigError(f"strategy options: {exc}") from None


__all__ = ["DeepSpeedStrategy", "FSDP2Strategy", "STRATEGIES", "Strategy", "build_strategy", "choose_strategy",
           "is_sharded"]
