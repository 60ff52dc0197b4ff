"""The stages a raw row goes through before packing, one piece of code for training and for the tools.

    raw row --dataset_map_fn--> conversation --template_map_fn--> templated --encode--> ids and labels
            --truncate--> at most max_length tokens (a cut row says so)

``RowProcessor`` runs them: batched inside ``process_hf_dataset`` (the training data), one row at a
time with ``stage()`` for ``lmtune check-dataset``, which therefore shows exactly what training
makes of a row. ``row_processor`` builds it from a ``train_dataset`` config's keys, ``truncate`` is
the one truncation (the MOSS reader keeps whole turns instead, as XTuner's does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lmtune.config.build import build, is_type_dict
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError, nearest
from lmtune.dataset.encode import ConversationEncoder
from lmtune.dataset.truncation import truncate

OK, EMPTY, NO_TARGET, BAD = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", EMPTY: "dropped by the map function", NO_TARGET: "nothing to train after truncation",
                BAD: "malformed"}


def as_function(fn: Any, key: str) -> Callable | None:
    """A ``dataset_map_fn`` / ``template_map_fn`` setting as a function: a format name, a function or a
    ``dict(type=...)`` that builds one."""
    if fn is None:
        return None
    if isinstance(fn, str):
        from lmtune.dataset.map_fns import DATASET_FORMAT_MAPPING

        if fn not in DATASET_FORMAT_MAPPING:
            raise ConfigError(f"{key}={fn!r} is not a known dataset format{nearest(fn, DATASET_FORMAT_MAPPING)} "
                              "(lmtune list-dataset-format lists them)")
        return DATASET_FORMAT_MAPPING[fn]
    fn = build(fn, key=key)
    if not callable(fn):
        raise ConfigError(f"{key} must be a function, got {type(fn).__name__}")
    return fn


def train_split(dataset: Any, split: str):
    """The ``split`` of a DatasetDict (a Dataset as it is)."""
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ConfigError(f"the dataset has no split {split!r} (it has {list(dataset)}); set split=...")
        return dataset[split]
    return dataset


def describe_source(dataset: Any) -> str:
    """Where the rows come from, for error messages: the data files, path or dataset name."""
    if is_type_dict(dataset):
        for key in ("data_files", "data_dir", "path", "dataset_path"):
            if dataset.get(key):
                return f"{dataset[key]}"
    files = getattr(dataset, "cache_files", None)
    if files:
        return files[0].get("filename", "the dataset")
    return "the dataset"


@dataclasses.dataclass
class StagedRow:
    """One row after each stage; ``status`` says how far it got (``error`` why it stopped, when BAD)."""

    index: int
    raw: dict
    conversation: dict | None = None  # after dataset_map_fn
    templated: dict | None = None  # after template_map_fn
    encoded: dict | None = None  # input_ids, labels, length (truncated), after truncation
    status: int = OK
    truncated: bool = False
    stage: str = ""  # the stage that failed
    error: str = ""


class RowProcessor:
    """The batched function of the first pass: row -> conversation -> template -> ids and labels.

    Each output row carries a ``status`` (OK, EMPTY: the map function dropped it,
    NO_TARGET: nothing left to train after truncation, BAD: malformed and
    skipped) and whether it was truncated, so the pipeline can count and report.
    """

    def __init__(self, map_fn, template_fn, encoder, max_length: int | None, source: str,
                 skip_bad_rows: bool, prompt_only: bool = False) -> None:
        self.map_fn, self.template_fn, self.encoder = map_fn, template_fn, encoder
        self.max_length, self.source, self.skip_bad_rows = max_length, source, skip_bad_rows
        # XTuner's input_ids_with_output=False: the prompts alone (nothing trained), the raw row's own scalar
        # fields kept beside them (an evaluation set's answer and subject, as mmlu_collate_fn reads them)
        self.prompt_only = prompt_only

    def _fail(self, staged: StagedRow, stage: str, exc: Exception) -> None:
        staged.status, staged.stage = BAD, stage
        staged.error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"

    def _raise_if_bad(self, staged: StagedRow) -> None:
        if staged.status == BAD and not self.skip_bad_rows:
            raise ConfigError(f"{staged.stage} failed on row {staged.index} of {self.source}: {staged.error} "
                              "(set skip_bad_rows=True in train_dataset to skip such rows)")

    def conversation(self, row: dict, index: int) -> StagedRow:
        """The map function and the template for one row (never raises: a failure is the row's status)."""
        staged = StagedRow(index=index, raw=row)
        stage = "dataset_map_fn"
        try:
            if self.map_fn is not None:
                row = self.map_fn(dict(row))
            conversation = row.get("conversation") if isinstance(row, dict) else None
            if conversation is None:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"it produced no 'conversation' (got fields {fields}); set dataset_map_fn "
                                  "to the function for your data's format (lmtune check-dataset CONFIG helps)")
            staged.conversation = row
            if not conversation:
                staged.status = EMPTY
                return staged
            stage = "template_map_fn"
            staged.templated = self.template_fn(row) if self.template_fn is not None else row
            if self.prompt_only:
                staged.templated = {**staged.templated, "conversation": [
                    {**turn, "output": "", "need_eos_token": False} for turn in staged.templated["conversation"]]}
        except Exception as exc:  # noqa: BLE001 - reported with the row, or counted when skipping
            self._fail(staged, stage, exc)
        return staged

    def encode(self, staged: StagedRow) -> StagedRow:
        """Tokenize and truncate a row that got through ``conversation``."""
        if staged.status != OK:
            return staged
        try:
            encoded = self.encoder(staged.templated)
        except Exception as exc:  # noqa: BLE001 - reported with the row, or counted when skipping
            self._fail(staged, "tokenization", exc)
            return staged
        cut = bool(encoded.get("truncated"))  # the encoder cut it already (a row far longer than max_length)
        encoded = truncate({"input_ids": list(encoded["input_ids"]), "labels": list(encoded["labels"]),
                            "length": len(encoded["input_ids"])}, self.max_length)
        staged.encoded, staged.truncated = encoded, cut or bool(encoded.get("truncated"))
        labels = encoded["labels"]
        if not self.prompt_only and len(labels) - 1 - labels[1:].count(IGNORE_INDEX) <= 0:  # nothing to train
            staged.status = NO_TARGET
        return staged

    def stage(self, row: dict, index: int = 0) -> StagedRow:
        """Every stage for one row, as training runs them (for the tools; never raises)."""
        staged = self.conversation(row, index)
        if staged.status == OK:
            self.encoder.prefetch([staged.templated])
        return self.encode(staged)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        names = list(batch)
        staged = [self.conversation({name: batch[name][k] for name in names}, index)
                  for k, index in enumerate(indices)]
        for row in staged:
            self._raise_if_bad(row)
        self.encoder.prefetch([row.templated for row in staged if row.status == OK])
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": [], "truncated": []}
        carried = [name for name in names if name not in out and self.prompt_only
                   and all(isinstance(v, (str, int, float)) for v in batch[name])]
        for name in carried:
            out[name] = list(batch[name])
        for row in staged:
            self.encode(row)
            self._raise_if_bad(row)
            encoded = row.encoded or {"input_ids": [], "labels": []}
            out["input_ids"].append(encoded["input_ids"])
            out["labels"].append(encoded["labels"])
            out["length"].append(len(encoded["input_ids"]))
            out["status"].append(row.status)
            out["truncated"].append(row.truncated)
        return out


def row_processor(tokenizer: Any, max_length: int | None, dataset_map_fn: Any = None, template_map_fn: Any = None,
                  source: str = "the dataset", skip_bad_rows: bool = False, prompt_only: bool = False) -> RowProcessor:
    """The ``RowProcessor`` of a ``train_dataset``'s settings (``tokenizer`` built or a config dict)."""
    return RowProcessor(as_function(dataset_map_fn, "train_dataset.dataset_map_fn"),
                        as_function(template_map_fn, "train_dataset.template_map_fn"),
                        # max_length lets the encoder cut a text far longer than it before tokenizing
                        ConversationEncoder(build(tokenizer, key="tokenizer"), max_length),
                        max_length, source, skip_bad_rows, prompt_only)


__all__ = ["BAD", "EMPTY", "NO_TARGET", "OK", "RowProcessor", "StagedRow", "as_function", "describe_source",
           "row_processor", "train_split", "truncate"]
