"""The runner and its training loop."""

from lmtune.engine.runner.loops import TrainLoop
from lmtune.engine.runner.runner import Runner

__all__ = ["Runner", "TrainLoop"]
