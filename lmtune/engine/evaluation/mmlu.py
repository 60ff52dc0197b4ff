"""MMLUMetric: multiple-choice accuracy from the next-token logits of the four answer letters (XTuner's)."""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config.build import build
from lmtune.core.errors import ConfigError

LETTERS = ("A", "B", "C", "D")

# MMLU's subjects, each under its subcategory; the subcategories under the four categories
SUBCATEGORIES = {
    "math": ["abstract_algebra", "college_mathematics", "elementary_mathematics", "high_school_mathematics",
             "high_school_statistics"],
    "health": ["anatomy", "clinical_knowledge", "college_medicine", "human_aging", "medical_genetics", "nutrition",
               "professional_medicine", "virology"],
    "physics": ["astronomy", "college_physics", "conceptual_physics", "high_school_physics"],
    "business": ["business_ethics", "management", "marketing"],
    "biology": ["college_biology", "high_school_biology"],
    "chemistry": ["college_chemistry", "high_school_chemistry"],
    "computer science": ["college_computer_science", "computer_security", "high_school_computer_science",
                         "machine_learning"],
    "economics": ["econometrics", "high_school_macroeconomics", "high_school_microeconomics"],
    "engineering": ["electrical_engineering"],
    "philosophy": ["formal_logic", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
                   "world_religions"],
    "other": ["global_facts", "miscellaneous", "professional_accounting"],
    "history": ["high_school_european_history", "high_school_us_history", "high_school_world_history",
                "prehistory"],
    "geography": ["high_school_geography"],
    "politics": ["high_school_government_and_politics", "public_relations", "security_studies",
                 "us_foreign_policy"],
    "psychology": ["high_school_psychology", "professional_psychology"],
    "culture": ["human_sexuality", "sociology"],
    "law": ["international_law", "jurisprudence", "professional_law"],
}
CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other (business, health, misc.)": ["other", "business", "health"],
}
SUBCATEGORY_OF = {subject: sub for sub, subjects in SUBCATEGORIES.items() for subject in subjects}


class MMLUMetric:
    """Accuracy (in %) of the letter whose token the model finds likeliest after each prompt, among A-D.

    Reported per subject, subcategory and category, and ``average`` (the mean over the subjects present, as
    XTuner reports it), each under ``prefix`` (``mmlu_fs_val/average``). ``tokenizer``: a tokenizer or its
    config; the letters' token ids are those of ``'A'`` .. ``'D'`` encoded alone."""

    def __init__(self, tokenizer: Any, prefix: str | None = None, collect_device: str = "cpu", **unused: Any) -> None:
        if tokenizer is None:
            raise ConfigError("MMLUMetric needs the tokenizer (tokenizer=tokenizer in val_evaluator)")
        tokenizer = build(tokenizer, key="val_evaluator.tokenizer")
        self.letter_ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
        self.prefix = prefix
        self.results: list[tuple[str, int, int]] = []

    def metric_names(self) -> list[str]:
        return ["average", *CATEGORIES, *SUBCATEGORIES, *SUBCATEGORY_OF]

    def process(self, data_batch: dict, logits: torch.Tensor) -> None:
        """One batch: ``logits`` are the next-token logits after each row's prompt."""
        if "answers" not in data_batch or "subjects" not in data_batch:
            raise ConfigError("MMLUMetric reads each row's answer letter and subject from the batches of "
                              "mmlu_collate_fn: set val_dataloader.collate_fn=dict(type=mmlu_collate_fn)")
        choices = logits[:, self.letter_ids].argmax(dim=-1).tolist()
        for subject, answer, choice in zip(data_batch["subjects"], data_batch["answers"], choices):
            if answer not in LETTERS:
                raise ConfigError(f"MMLUMetric: an answer must be one of {'/'.join(LETTERS)}, got {answer!r} (the "
                                  "rows' output field)")
            self.results.append((subject, choice, LETTERS.index(answer)))

    @staticmethod
    def compute(results: list) -> dict[str, float]:
        def accuracy(rows: list) -> float:
            return 100.0 * sum(choice == truth for _, choice, truth in rows) / len(rows)

        by_subject: dict[str, list] = {}
        for row in results:
            by_subject.setdefault(row[0], []).append(row)
        metrics = {subject: accuracy(rows) for subject, rows in sorted(by_subject.items())}
        for sub, subjects in SUBCATEGORIES.items():
            rows = [row for subject in subjects for row in by_subject.get(subject, [])]
            if rows:
                metrics[sub] = accuracy(rows)
        for category, subs in CATEGORIES.items():
            rows = [row for sub in subs for subject in SUBCATEGORIES[sub] for row in by_subject.get(subject, [])]
            if rows:
                metrics[category] = accuracy(rows)
        subject_scores = [metrics[s] for s in by_subject]
        metrics["average"] = sum(subject_scores) / len(subject_scores) if subject_scores else 0.0
        return metrics
