"""Hooks: the mmengine-named ones XTuner configs use, and lmtune's own."""

from lmtune.engine.hooks.basic import (
    DistSamplerSeedHook,
    IterTimerHook,
    ParamSchedulerHook,
    VarlenAttnArgsToMessageHubHook,
)
from lmtune.engine.hooks.chat import DatasetInfoHook, EvaluateChatHook
from lmtune.engine.hooks.checkpoint import CheckpointHook
from lmtune.engine.hooks.hf_checkpoint import HFCheckpointHook
from lmtune.engine.hooks.hook import Hook
from lmtune.engine.hooks.logger import LoggerHook
from lmtune.engine.hooks.throughput import ThroughputHook

__all__ = [
    "CheckpointHook", "DatasetInfoHook", "DistSamplerSeedHook", "EvaluateChatHook", "HFCheckpointHook", "Hook",
    "IterTimerHook", "LoggerHook", "ParamSchedulerHook", "ThroughputHook", "VarlenAttnArgsToMessageHubHook",
]
