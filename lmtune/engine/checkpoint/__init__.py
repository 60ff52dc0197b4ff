"""Checkpoints: one owner for everything a run saves and reads back.

- ``format``: the atomic ``iter_N`` directories (write, verify, find the newest, load);
- ``Checkpointer``: what goes into a checkpoint and back out of it (weights through the strategy,
  optimizer state or per-rank shards, scheduler and loop position, RNG states), resume and load_from;
- ``hook``: ``CheckpointHook``, which decides when to save and how many to keep;
- ``export`` and ``hf_hook``: Hugging Face adapters and models from a checkpoint (``lmtune convert``
  and ``HFCheckpointHook``).

``from lmtune.engine import checkpoint as ckpt`` gives the format's functions and names.
"""

from lmtune.engine.checkpoint.checkpointer import Checkpointer, rng_state, set_rng_state
from lmtune.engine.checkpoint.format import (
    META,
    OPTIMIZER,
    POINTER,
    SLOW_SAVE_ENV,
    TRAINER,
    WEIGHTS,
    find_latest,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    optimizer_shard_name,
    read_meta,
    read_pointer,
    remove_old,
    run_of,
    save_checkpoint,
    staged_shard_path,
    verify_checkpoint,
    write_staged_shard,
    write_text_atomic,
)

__all__ = [
    "META", "OPTIMIZER", "POINTER", "SLOW_SAVE_ENV", "TRAINER", "WEIGHTS", "Checkpointer", "find_latest",
    "is_complete", "list_checkpoints", "load_checkpoint", "optimizer_shard_name", "read_meta", "read_pointer",
    "remove_old", "rng_state", "run_of",
    "save_checkpoint", "set_rng_state", "staged_shard_path", "verify_checkpoint", "write_staged_shard",
    "write_text_atomic",
]
