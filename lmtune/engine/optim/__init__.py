"""Optimizer wrappers and learning-rate schedulers."""

from lmtune.engine.optim.optimizer_wrapper import AmpOptimWrapper, OptimWrapper, StepSettings
from lmtune.engine.optim.scheduler import ConstantLR, CosineAnnealingLR, LinearLR

__all__ = ["AmpOptimWrapper", "ConstantLR", "CosineAnnealingLR", "LinearLR", "OptimWrapper", "StepSettings"]
