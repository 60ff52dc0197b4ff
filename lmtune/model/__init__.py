"""The fine-tuned model wrapper."""

from lmtune.model.sft import SupervisedFinetune

__all__ = ["SupervisedFinetune"]
