"""``lmtune check-dataset``, ``log-dataset`` and ``list-dataset-format``."""

from __future__ import annotations

import inspect
import json
from typing import Any, TextIO

from lmtune.config import Config, ConfigError, build, is_type_dict
from lmtune.config.build import resolve_callable
from lmtune.dataset.huggingface import process_hf_dataset
from lmtune.dataset.preference import PAIR_STATUS, build_preference_dataset, pair_processor
from lmtune.dataset.stages import BAD, OK, STATUS_NAMES, as_function, describe_source, row_processor, train_split
from lmtune.engine.hooks.chat import DatasetInfoHook


def dataset_configs(cfg: Config) -> list[dict]:
    """The ``process_hf_dataset`` dicts of a config (several when it uses ConcatDataset)."""
    dataset = (cfg.get("train_dataloader") or {}).get("dataset") or cfg.get("train_dataset")
    if dataset is None:
        raise ConfigError("the config has no train_dataloader.dataset")
    if is_type_dict(dataset) and "datasets" in dataset:
        return [dict(d) for d in dataset["datasets"]]
    if not is_type_dict(dataset):
        raise ConfigError("train_dataloader.dataset is not a dict(type=...) config")
    return [dict(dataset)]


def list_dataset_formats(out: TextIO) -> None:
    from lmtune.dataset.map_fns import DATASET_FORMAT_MAPPING

    width = max(len(name) for name in DATASET_FORMAT_MAPPING)
    for name, fn in DATASET_FORMAT_MAPPING.items():
        doc = (inspect.getdoc(fn) or "").splitlines()
        out.write(f"{name:<{width}}  {fn.__name__:<26} {doc[0] if doc else ''}\n")


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _fitting_formats(rows: list[dict]) -> list[str]:
    from lmtune.dataset.map_fns import DATASET_FORMAT_MAPPING

    fits = []
    for name, fn in DATASET_FORMAT_MAPPING.items():
        try:
            if all(fn(dict(row)).get("conversation") is not None for row in rows) and any(
                    fn(dict(row))["conversation"] for row in rows):
                fits.append(name)
        except Exception:  # noqa: BLE001 - a format that does not fit raises; that is the answer
            continue
    return fits


def check_dataset(cfg: Config, out: TextIO, rows_to_show: int = 2, max_problems: int = 20) -> int:
    """Print what each stage makes of the first rows and every malformed row; return the problem count.

    The rows go through the stages of training itself (``lmtune.dataset.stages``): the same map function,
    template, tokenization and truncation."""
    problems = 0
    for n, ds_cfg in enumerate(dataset_configs(cfg)):
        fn = resolve_callable(ds_cfg.pop("type"), "train_dataset")
        if fn is build_preference_dataset:
            problems += check_pairs(n, ds_cfg, out, rows_to_show, max_problems)
            continue
        if fn is not process_hf_dataset:
            out.write(f"[dataset {n}] {getattr(fn, '__name__', fn)} is not process_hf_dataset; skipped\n")
            continue
        source = describe_source(ds_cfg["dataset"])
        raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
        out.write(f"== dataset {n}: {len(raw)} rows, fields {raw.column_names}\n")
        sample = [raw[i] for i in range(min(len(raw), 20))]
        fits = _fitting_formats(sample)
        map_fn = as_function(ds_cfg.get("dataset_map_fn"), "dataset_map_fn")
        out.write(f"formats that fit the first rows: {', '.join(fits) or 'none (write a map function)'}\n")
        if map_fn is None:
            ready = "conversation" in raw.column_names
            out.write("dataset_map_fn: none configured" + (" (rows are already conversations)\n" if ready else
                      "; one is needed: set dataset_map_fn to one of the fitting formats\n"))
        else:
            out.write(f"dataset_map_fn: {getattr(map_fn, '__name__', map_fn)}\n")
        if not ds_cfg.get("do_dataset_tokenization", True):
            continue
        tokenizer = build(ds_cfg["tokenizer"], key="tokenizer")
        processor = row_processor(tokenizer, ds_cfg.get("max_length"), ds_cfg.get("dataset_map_fn"),
                                  ds_cfg.get("template_map_fn"), source)
        for i, row in enumerate(sample[:rows_to_show]):
            out.write(f"-- row {i}\n[raw] {_short(row)}\n")
            staged = processor.stage(row, i)
            if staged.conversation is not None:
                out.write(f"[conversation] {_short(staged.conversation.get('conversation'))}\n")
            if staged.status == BAD:
                out.write(f"[error] {staged.stage}: {staged.error}\n")
                continue
            if staged.encoded is None:
                out.write(f"[{STATUS_NAMES[staged.status]}]\n")
                continue
            encoded = staged.encoded
            out.write("[text, trained part between >>> and <<<]\n" + mark_trained(tokenizer, encoded) + "\n")
            out.write(f"[input_ids] {_short(encoded['input_ids'], 200)}\n[labels] {_short(encoded['labels'], 200)}\n")
            if staged.truncated:
                out.write(f"[truncated to max_length={processor.max_length}]\n")
            if staged.status != OK:
                out.write(f"[{STATUS_NAMES[staged.status]}]\n")
        bad = 0
        for index in range(len(raw)):
            staged = processor.conversation(raw[index], index)
            if staged.status == BAD:
                bad += 1
                if bad <= max_problems:
                    out.write(f"[problem] row {index} of {source}: {staged.error}\n")
        problems += bad
        if bad:
            out.write(f"{bad} malformed rows (set skip_bad_rows=True to skip them)\n")
            continue
        processed = process_hf_dataset(**{**ds_cfg, "use_cache": False})
        if ds_cfg.get("pack_to_max_length", True) and len(processed):
            row = processed[0]
            out.write(f"[packed row 0] {len(row['input_ids'])} tokens, samples of {row['num_tokens']}\n")
        out.write(f"OK: {len(processed)} training rows\n")
    return problems


def check_pairs(n: int, ds_cfg: dict, out: TextIO, rows_to_show: int, max_problems: int) -> int:
    """``check_dataset`` for preference data: each shown pair's chosen and rejected sequence with its trained
    part marked, every malformed row, the counts of the whole dataset; returns the malformed rows."""
    source = describe_source(ds_cfg["dataset"])
    raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
    out.write(f"== dataset {n} (preference pairs): {len(raw)} rows, fields {raw.column_names}\n")
    tokenizer = build(ds_cfg["tokenizer"], key="tokenizer")
    processor = pair_processor(tokenizer, ds_cfg.get("max_length"), ds_cfg.get("dataset_map_fn"),
                               ds_cfg.get("is_reward", False), ds_cfg.get("reward_token_id", -1),
                               ds_cfg.get("is_reference", False), ds_cfg.get("max_response_length", 4096), source)
    map_fn = processor.map_fn
    out.write(f"dataset_map_fn: {getattr(map_fn, '__name__', map_fn) if map_fn else 'none (rows are pairs)'}\n")
    bad = 0
    for index in range(len(raw)):
        shown = index < rows_to_show
        if shown:
            out.write(f"-- row {index}\n[raw] {_short(raw[index])}\n")
        try:
            pair = processor.encode(raw[index], index)
        except ConfigError as exc:
            bad += 1
            if bad <= max_problems:
                out.write(f"[problem] {exc}\n")
            continue
        if not shown:
            continue
        chosen, rejected = pair["num_tokens"]
        for name, start, length in (("chosen", 0, chosen), ("rejected", chosen, rejected)):
            part = {k: pair[k][start:start + length] for k in ("input_ids", "labels")}
            out.write(f"[{name}: {length} tokens, trained part between >>> and <<<]\n"
                      + mark_trained(tokenizer, part) + "\n")
        if pair["status"] != OK or pair["truncated"]:
            out.write(f"[{'truncated to max_length' if pair['status'] == OK else PAIR_STATUS[pair['status']]}]\n")
    if bad:
        out.write(f"{bad} malformed rows (set skip_bad_rows=True to skip them)\n")
        return bad
    processed = build_preference_dataset(**{**ds_cfg, "use_cache": False})
    out.write(f"OK: {len(processed)} training rows\n")
    return 0


def mark_trained(tokenizer, encoded: dict) -> str:
    """The row's text with each trained span between >>> and <<<."""
    parts, run, trained = [], [], None
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        is_trained = label != -100
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run)
            parts.append(f">>>{text}<<<" if trained else text)
            run = []
        run.append(token)
        trained = is_trained
    if run:
        text = tokenizer.decode(run)
        parts.append(f">>>{text}<<<" if trained else text)
    return "".join(parts)


def log_dataset(cfg: Config, show: str, out: TextIO, rows: int = 1) -> None:
    """Print the first processed training rows as text, masked text, ids and/or labels."""
    dataset = build(cfg.train_dataloader.dataset, key="train_dataloader.dataset")
    tokenizer = None
    for ds_cfg in dataset_configs(cfg):
        if ds_cfg.get("tokenizer") is not None:
            tokenizer = build(ds_cfg["tokenizer"], key="tokenizer")
            break
    for i in range(min(rows, len(dataset))):
        row = dataset[i]
        out.write(f"== row {i} ({len(row['input_ids'])} tokens)\n")
        if show in ("text", "all") and tokenizer is not None:
            out.write("[text]\n" + tokenizer.decode(row["input_ids"]) + "\n")
        if show in ("masked_text", "all") and tokenizer is not None:
            out.write("[masked_text]\n" + DatasetInfoHook.render_labels(tokenizer, row["labels"]) + "\n")
        if show in ("input_ids", "all"):
            out.write(f"[input_ids]\n{list(row['input_ids'])}\n")
        if show in ("labels", "all"):
            out.write(f"[labels]\n{list(row['labels'])}\n")
