"""Hooks: the mmengine-named ones XTuner configs use, and lmtune's own."""

from lmtune.engine.hooks.basic import (
    DistSamplerSeedHook,
    IterTimerHook,
    ParamSchedulerHook,
    VarlenAttnArgsToMessageHubHook,
)
from lmtune.engine.hooks.chat import DatasetInfoHook, EvaluateChatHook
from lmtune.engine.hooks.hook import Hook
from lmtune.engine.hooks.logger import LoggerHook
from lmtune.engine.hooks.throughput import ThroughputHook

__all__ = [
    "CheckpointHook", "DatasetInfoHook", "DistSamplerSeedHook", "EvaluateChatHook", "HFCheckpointHook", "Hook",
    "IterTimerHook", "LoggerHook", "ParamSchedulerHook", "ThroughputHook", "VarlenAttnArgsToMessageHubHook",
]


# The checkpoint hooks live with the rest of checkpointing (lmtune.engine.checkpoint), which imports the
# Hook base from here; they are handed out on first use so that either package can be imported first.
_CHECKPOINT_HOOKS = {"CheckpointHook": "lmtune.engine.checkpoint.hook",
                     "HFCheckpointHook": "lmtune.engine.checkpoint.hf_hook"}


def __getattr__(name: str):
    if name in _CHECKPOINT_HOOKS:
        import importlib

        return getattr(importlib.import_module(_CHECKPOINT_HOOKS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
