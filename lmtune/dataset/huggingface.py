"""``process_hf_dataset``: rows -> map_fn -> template -> tokens and labels -> packed rows.

One batched pass turns raw rows into token ids and labels (map function,
template and tokenization together, in ``map_num_proc`` processes), a second
packs them. The result is cached on disk (see :mod:`lmtune.dataset.cache`);
with several ranks, rank 0 prepares it and the others load the cached copy.
"""

from __future__ import annotations

import logging
from typing import Any

from lmtune.config.build import build
from lmtune.core.dist import get_rank
from lmtune.core.errors import ConfigError
from lmtune.dataset import cache
from lmtune.dataset.holdout import holdout_rows
from lmtune.dataset.packing import PACKERS
from lmtune.dataset.stages import BAD, EMPTY, NO_TARGET, OK, describe_source, row_processor, train_split, truncate

logger = logging.getLogger("lmtune")

PACK_GROUP_SIZE = 10_000  # samples packed together; larger groups waste fewer tokens
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
    pack_strategy: str = "best_fit",
    skip_bad_rows: bool = False,
    use_cache: bool = True,
    dataset_wait_timeout: float = 3600,
    holdout: dict | None = None,
):
    """Build the training dataset of tokenized (and, by default, packed) rows.

    ``dataset``: a ``datasets`` Dataset/DatasetDict or a config dict such as
    ``dict(type=load_dataset, path=...)`` (or ``dict(type=load_from_disk, ...)``
    with ``do_dataset_tokenization=False`` for rows that already hold
    ``input_ids`` and ``labels``). ``dataset_map_fn`` turns a row into the
    conversation format (a function or a format name); ``template_map_fn``
    applies the prompt template. Rows come out with ``input_ids``, ``labels``
    (``-100`` where not trained) and, when packed, ``num_tokens`` (the lengths
    of the samples in the row).

    ``pack_strategy``: 'best_fit' (whole samples, best-fit decreasing, the
    default) or 'concat' (XTuner's concatenate-and-cut; fills rows, splits
    samples). Either way samples never attend to each other. ``use_varlen_attn``
    needs no different data (see the model and collate function).
    ``skip_bad_rows`` skips and counts malformed rows instead of stopping.
    ``use_cache`` keeps the result on disk, keyed by everything that changes it.
    ``holdout`` (set by ``val_split``, see ``lmtune.dataset.holdout``): only the training or the validation part
    of the rows.
    ``input_ids_with_output=False`` (XTuner's evaluation sets, such as MMLU's): the rows
    hold the prompts alone, nothing trained, with the raw rows' own scalar fields (an
    answer, a subject) beside them; such rows are not packed.
    ``remove_unused_columns`` and ``with_output`` are accepted for XTuner configs;
    lmtune otherwise keeps only the model's columns.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ConfigError(f"train_dataset.max_length (the max_length setting) must be an integer of at least 2 "
                          f"tokens, got {max_length!r}")
    if pack_to_max_length and pack_strategy not in PACKERS:
        raise ConfigError(f"pack_strategy={pack_strategy!r} is not one of {sorted(PACKERS)}")
    if pack_to_max_length and max_length is None:
        raise ConfigError("pack_to_max_length=True needs max_length")
    prompt_only = not input_ids_with_output
    if prompt_only and pack_to_max_length:
        raise ConfigError("input_ids_with_output=False (prompts without answers, for evaluation) needs "
                          "pack_to_max_length=False")
    source = describe_source(dataset)
    tok = processor = None
    if do_dataset_tokenization:
        if tokenizer is None:
            raise ConfigError("train_dataset needs a tokenizer to tokenize the data")
        if max_length is None:
            raise ConfigError("train_dataset needs max_length")
        tok = build(tokenizer, key="tokenizer")
        processor = row_processor(tok, max_length, dataset_map_fn, template_map_fn, source, skip_bad_rows, prompt_only)
        if get_rank() == 0:  # a template that is not the tokenizer's chat template: said once
            from lmtune.dataset.template_check import warn_if_unlike_chat_template

            warn_if_unlike_chat_template(tok, getattr(processor.template_fn, "keywords", {}).get("template"))
    map_fn = processor.map_fn if processor is not None else None
    template_fn = processor.template_fn if processor is not None else None

    return cache.prepared(
        dataset, use_cache, dataset_wait_timeout,
        lambda: _process(dataset, split, processor, source, max_length, max_dataset_length, rename_maps,
                         shuffle_before_pack, pack_to_max_length, pack_strategy, map_num_proc, seed, holdout),
        lambda stats: _log_stats(source, stats),
        split=split, tokenizer=cache.tokenizer_signature(tok) if tok is not None else None,
        map_fn=map_fn, template_fn=template_fn, max_length=max_length, max_dataset_length=max_dataset_length,
        rename_maps=rename_maps, shuffle_before_pack=shuffle_before_pack, pack=pack_to_max_length,
        pack_strategy=pack_strategy, tokenize=do_dataset_tokenization, skip_bad_rows=skip_bad_rows, seed=seed,
        **({"holdout": holdout} if holdout else {}), **({"prompt_only": True} if prompt_only else {}))


def _process(dataset, split, processor, source, max_length, max_dataset_length, rename_maps, shuffle_before_pack,
             pack_to_max_length, pack_strategy, map_num_proc, seed, holdout=None):
    """``processor`` None: the rows are tokenized already (``do_dataset_tokenization=False``)."""
    dataset = train_split(build(dataset, key="train_dataset.dataset"), split)
    stats: dict[str, Any] = {"rows": len(dataset)}
    if max_dataset_length is not None and len(dataset) > max_dataset_length:
        dataset = dataset.shuffle(seed=seed).select(range(max_dataset_length))
        stats["subsampled_to"] = max_dataset_length
    if holdout:
        dataset = holdout_rows(dataset, holdout, source)
        stats["holdout"] = f"{holdout['part']} part of val_split={holdout['size']!r}: {len(dataset)} rows"
    for old, new in rename_maps or []:
        dataset = dataset.rename_column(old, new)

    if processor is not None:
        # never datasets' own cache of map results: it is keyed by the processor's state, not lmtune's code, so
        # a changed lmtune would read rows made by the old one (lmtune's cache is keyed by its version)
        dataset = dataset.map(processor, batched=True, batch_size=1000, with_indices=True, load_from_cache_file=False,
                              remove_columns=dataset.column_names, num_proc=map_num_proc,
                              desc="Tokenizing")
        status, truncated = _column(dataset, "status"), _column(dataset, "truncated")
        stats.update(empty=int((status == EMPTY).sum()), bad=int((status == BAD).sum()),
                     no_target=int((status == NO_TARGET).sum()), truncated=int(truncated.sum()))
        if stats["rows"] and not (status == OK).any():
            raise ConfigError(_empty_reason(stats, source, max_length))
        dataset = dataset.filter(lambda s: [x == OK for x in s], input_columns="status", batched=True,
                                 num_proc=map_num_proc, desc="Dropping rows without trained tokens")
        dataset = dataset.remove_columns(["status", "truncated"])
    else:
        missing = {"input_ids", "labels"} - set(dataset.column_names)
        if missing:
            raise ConfigError(f"do_dataset_tokenization=False needs tokenized rows; {source} lacks {sorted(missing)}")
        keep = [c for c in dataset.column_names if c in ("input_ids", "labels")]
        dataset = dataset.select_columns(keep)
        dataset = dataset.map(lambda row: {
            key: value for key, value in truncate({**row, "length": len(row["input_ids"])}, max_length).items()
            if key != "truncated"}, num_proc=map_num_proc)
    stats["samples"] = len(dataset)
    if len(dataset) == 0:
        raise ConfigError(_empty_reason(stats, source, max_length))

    if pack_to_max_length:
        if shuffle_before_pack:
            dataset = dataset.shuffle(seed=seed)
        keep = ["input_ids", "labels", "length"]
        dataset = dataset.select_columns(keep).map(
            PACKERS[pack_strategy], batched=True, batch_size=PACK_GROUP_SIZE, fn_kwargs={"max_length": max_length},
            remove_columns=keep, desc=f"Packing to {max_length} tokens ({pack_strategy})")
        lengths = _column(dataset, "length")
        stats.update(packed_rows=len(dataset), fill_rate=float(lengths.sum()) / max(len(dataset) * max_length, 1))
    return dataset, stats


def _column(dataset, name: str):
    """A column as a numpy array, read from Arrow without converting rows to Python."""
    import numpy as np

    return np.asarray(dataset.flatten_indices().data.column(name).to_numpy(zero_copy_only=False))


def _empty_reason(stats: dict, source: str, max_length: int | None) -> str:
    if stats.get("rows", 0) == 0:
        return f"{source} has no rows"
    if stats.get("bad"):
        return f"every row of {source} was malformed and skipped ({stats['bad']} rows)"
    if stats.get("empty", 0) and not stats.get("no_target"):
        return (f"the dataset_map_fn dropped every row of {source} ({stats['empty']} rows): is it the right "
                "format for this data?")
    return (f"no row of {source} has a trained token left after truncation to max_length={max_length} "
            f"({stats.get('no_target', 0)} rows had none): raise max_length or check the template")


def _log_stats(source: str, stats: dict) -> None:
    parts = [f"{stats.get('rows', 0)} rows"]
    if stats.get("subsampled_to") is not None:
        parts.append(f"sub-sampled to {stats['subsampled_to']}")
    if stats.get("holdout"):
        parts.append(stats["holdout"])
    for key, text in (("empty", "dropped by the map function"), ("bad", "malformed and skipped"),
                      ("truncated", "longer than max_length (truncated)"),
                      ("no_target", "dropped: nothing to train after truncation")):
        if stats.get(key):
            parts.append(f"{stats[key]} {text}")
    parts.append(f"{stats.get('samples', 0)} samples")
    if "packed_rows" in stats:
        parts.append(f"packed into {stats['packed_rows']} rows (fill rate {100 * stats['fill_rate']:.1f}%)")
    logger.info(f"Dataset {source}: " + ", ".join(parts))
