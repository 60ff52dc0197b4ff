"""Evaluation metrics of generated answers and of multiple-choice logits (``xtuner.evaluation`` in configs)."""

from lmtune.engine.evaluation.answers import answer_scores, mean_scores, normalize, rouge_l
from lmtune.engine.evaluation.mmlu import MMLUMetric

__all__ = ["MMLUMetric", "answer_scores", "mean_scores", "normalize", "rouge_l"]
