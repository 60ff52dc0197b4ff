"""The runner, its training loop and its validation loop."""

from lmtune.engine.runner.loops import TrainLoop
from lmtune.engine.runner.runner import Runner
from lmtune.engine.runner.validation import ValLoop

__all__ = ["Runner", "TrainLoop", "ValLoop"]
