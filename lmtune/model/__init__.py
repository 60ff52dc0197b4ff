"""The models being trained: supervised fine-tuning, preference training (DPO, ORPO, SimPO), reward models."""

from lmtune.model.preference import DPO, ORPO, SimPO
from lmtune.model.reward import RewardModel
from lmtune.model.sft import SupervisedFinetune

__all__ = ["DPO", "ORPO", "RewardModel", "SimPO", "SupervisedFinetune"]
