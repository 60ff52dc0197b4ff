"""Datasets: processing Hugging Face datasets into tokenized, packed rows; samplers."""

from lmtune.dataset.concat import ConcatDataset
from lmtune.dataset.huggingface import process_hf_dataset
from lmtune.dataset.samplers import DefaultSampler

__all__ = ["ConcatDataset", "DefaultSampler", "process_hf_dataset"]
