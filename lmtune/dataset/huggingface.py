"""``process_hf_dataset``: rows -> map_fn -> template -> tokens and labels -> packed rows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lmtune.config.build import build
from lmtune.config.errors import ConfigError
from lmtune.dataset.encode import ConversationEncoder
from lmtune.dataset.packing import pack_batch
from lmtune.utils.constants import IGNORE_INDEX

logger = logging.getLogger("lmtune")

PACK_GROUP_SIZE = 10_000  # samples packed together; larger groups waste fewer tokens


def _as_function(fn: Any, key: str) -> Callable | None:
    if fn is None:
        return None
    if isinstance(fn, str):
        from lmtune.dataset.map_fns import DATASET_FORMAT_MAPPING

        if fn not in DATASET_FORMAT_MAPPING:
            from lmtune.config.errors import nearest

            raise ConfigError(f"{key}={fn!r} is not a known dataset format"
                              f"{nearest(fn, DATASET_FORMAT_MAPPING)}")
        return DATASET_FORMAT_MAPPING[fn]
    fn = build(fn, key=key)
    if not callable(fn):
        raise ConfigError(f"{key} must be a function, got {type(fn).__name__}")
    return fn


def _train_split(dataset: Any, split: str):
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ConfigError(f"the dataset has no split {split!r} (it has {list(dataset)}); set split=...")
        return dataset[split]
    return dataset


def process_hf_dataset(
    dataset: Any,
    tokenizer: Any = None,
    max_length: int | None = None,
    dataset_map_fn: Any = None,
    template_map_fn: Any = None,
    max_dataset_length: int | None = None,
    split: str = "train",
    remove_unused_columns: bool = False,
    rename_maps: list | None = None,
    shuffle_before_pack: bool = True,
    pack_to_max_length: bool = True,
    use_varlen_attn: bool = False,
    input_ids_with_output: bool = True,
    with_output: bool = True,
    do_dataset_tokenization: bool = True,
    map_num_proc: int | None = None,
    seed: int = 0,
):
    """Build the training dataset of tokenized (and, by default, packed) rows.

    ``dataset`` is a ``datasets`` Dataset/DatasetDict or a config dict such as
    ``dict(type=load_dataset, path=...)``. ``dataset_map_fn`` turns a row into
    the conversation format; ``template_map_fn`` applies the prompt template.
    Rows come out with ``input_ids``, ``labels`` (``-100`` where not trained)
    and, when packed, ``num_tokens`` (the lengths of the samples in the row).
    ``use_varlen_attn`` needs no different data: packed samples never attend to
    each other in lmtune; it selects variable-length attention kernels (see the
    model and collate function).
    """
    dataset = _train_split(build(dataset, key="train_dataset.dataset"), split)
    if max_dataset_length is not None and len(dataset) > max_dataset_length:
        dataset = dataset.shuffle(seed=seed).select(range(max_dataset_length))
    for old, new in rename_maps or []:
        dataset = dataset.rename_column(old, new)

    if do_dataset_tokenization:
        if tokenizer is None:
            raise ConfigError("train_dataset needs a tokenizer to tokenize the data")
        if max_length is None:
            raise ConfigError("train_dataset needs max_length")
        tokenizer = build(tokenizer, key="tokenizer")
        map_fn = _as_function(dataset_map_fn, "train_dataset.dataset_map_fn")
        tmpl_fn = _as_function(template_map_fn, "train_dataset.template_map_fn")
        original_columns = list(dataset.column_names)
        if map_fn is not None:
            dataset = _map_rows(dataset, map_fn, "dataset_map_fn")
        if tmpl_fn is not None:
            dataset = _map_rows(dataset, tmpl_fn, "template_map_fn")
        if "conversation" not in dataset.column_names:
            raise ConfigError("rows have no 'conversation' after the map functions: set dataset_map_fn "
                              f"to the function for your data's format (row fields: {original_columns})")
        dataset = dataset.filter(lambda row: len(row["conversation"]) > 0, desc="Dropping empty rows")
        drop = [c for c in dataset.column_names if c != "conversation"] if remove_unused_columns else []
        encoder = ConversationEncoder(tokenizer, max_length)
        dataset = dataset.map(encoder, remove_columns=drop + ["conversation"], num_proc=map_num_proc,
                              desc="Tokenizing")
        dataset = dataset.filter(lambda row: any(x != IGNORE_INDEX for x in row["labels"][1:]),
                                 desc="Dropping rows without trained tokens")
    else:
        missing = {"input_ids", "labels"} - set(dataset.column_names)
        if missing:
            raise ConfigError(f"do_dataset_tokenization=False needs tokenized rows; missing {sorted(missing)}")
        if max_length is not None:
            dataset = dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length],
                                               "labels": row["labels"][:max_length]})
        if "length" not in dataset.column_names:
            dataset = dataset.map(lambda row: {"length": len(row["input_ids"])})

    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty after processing: check data_path, the "
                          "dataset_map_fn and max_length")
    if pack_to_max_length:
        if max_length is None:
            raise ConfigError("pack_to_max_length=True needs max_length")
        if shuffle_before_pack:
            dataset = dataset.shuffle(seed=seed)
        keep = ["input_ids", "labels", "length"]
        dataset = dataset.select_columns(keep)
        dataset = dataset.map(pack_batch, batched=True, batch_size=PACK_GROUP_SIZE,
                              fn_kwargs={"max_length": max_length}, remove_columns=keep,
                              desc=f"Packing to {max_length} tokens")
    return dataset


def _map_rows(dataset, fn: Callable, what: str):
    """``dataset.map(fn)`` with the failing row named in the error."""
    def guarded(row, index):
        try:
            return fn(row)
        except ConfigError as exc:
            raise ConfigError(f"{what} failed on row {index}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - reported with the row
            raise ConfigError(f"{what} failed on row {index}: {type(exc).__name__}: {exc}") from exc

    return dataset.map(guarded, with_indices=True, desc=f"Applying {what}")
