"""Hooks: the mmengine-named ones XTuner configs use, and lmtune's own.

The checkpoint hooks live with the rest of checkpointing (``lmtune.engine.checkpoint``) and XTuner's
no-op ``VarlenAttnArgsToMessageHubHook`` in ``lmtune.compat.xtuner``; both are importable from here,
where configs have always imported them.
"""

from lmtune.compat.xtuner.hooks import VarlenAttnArgsToMessageHubHook
from lmtune.core.hook import Hook, RunView
from lmtune.engine.checkpoint.hf_hook import HFCheckpointHook
from lmtune.engine.checkpoint.hook import CheckpointHook
from lmtune.engine.hooks.basic import DistSamplerSeedHook, IterTimerHook, ParamSchedulerHook
from lmtune.engine.hooks.chat import DatasetInfoHook, EvaluateChatHook
from lmtune.engine.hooks.early_stopping import EarlyStoppingHook
from lmtune.engine.hooks.logger import LoggerHook
from lmtune.engine.hooks.throughput import ThroughputHook

__all__ = [
    "CheckpointHook", "DatasetInfoHook", "DistSamplerSeedHook", "EarlyStoppingHook", "EvaluateChatHook",
    "HFCheckpointHook", "Hook",
    "IterTimerHook", "LoggerHook", "ParamSchedulerHook", "RunView", "ThroughputHook",
    "VarlenAttnArgsToMessageHubHook",
]
