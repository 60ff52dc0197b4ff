"""Datasets: processing Hugging Face datasets into tokenized, packed rows; samplers."""

from lmtune.config.build import route_calls
from lmtune.dataset import loading
from lmtune.dataset.concat import ConcatDataset
from lmtune.dataset.huggingface import process_hf_dataset
from lmtune.dataset.intern_repo import (
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
    load_intern_repo_untokenized_dataset,
)
from lmtune.dataset.modelscope import process_ms_dataset
from lmtune.dataset.moss import MOSSSFTDataset
from lmtune.dataset.preference import build_preference_dataset, load_jsonl_dataset, preference_collate_fn
from lmtune.dataset.samplers import DefaultSampler
from lmtune.dataset.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, get_template

route_calls(loading.route)  # every load_dataset a config builds fails with the file and line named

__all__ = ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE", "ConcatDataset", "DefaultSampler", "MOSSSFTDataset",
           "build_packed_dataset", "get_template", "load_intern_repo_tokenized_dataset",
           "load_intern_repo_untokenized_dataset", "build_preference_dataset", "load_jsonl_dataset",
           "preference_collate_fn", "process_hf_dataset", "process_ms_dataset"]
