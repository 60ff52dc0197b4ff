"""InternLM-repo data, as XTuner's ``xtuner.dataset.intern_repo`` reads it, packed to fixed-length rows.

Two sources:

* tokenized files (``load_intern_repo_tokenized_dataset``): one JSON object per line with
  ``tokens``, a list of token ids where a token that is not trained is written negated.
  A row's input id is the absolute value, its label the id itself when positive and
  ``IGNORE_INDEX`` otherwise (so token 0 is never trained, as in XTuner). A ``<file>.meta``
  next to a file (a numpy array with one row per sample: byte offset first, length last)
  is used when present; without one the file is indexed by reading it once.
* untokenized chat files (``load_intern_repo_untokenized_dataset``): one JSON list of
  OpenAI-style messages per line, tokenized with the prompt template through
  :func:`~lmtune.dataset.huggingface.process_hf_dataset` (cached like any dataset).

``build_packed_dataset`` turns each loaded dataset into rows of exactly ``packed_length``
tokens: the samples in a seeded shuffled order, concatenated and cut every
``packed_length`` tokens, the last incomplete row left out (XTuner's packing, so a run
has as many rows as under XTuner). Rows are assembled when read. Each piece of a sample
in a row is its own segment, listed in ``num_tokens``: ``default_collate_fn`` restarts
the position ids there, and the first label of every piece is ignored, exactly as in
lmtune's own packing (:mod:`lmtune.dataset.packing`), so no token is predicted from
another sample.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.config.build import build
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset.concat import ConcatDataset

logger = logging.getLogger("lmtune")

COMPRESSED_SUFFIXES = (".gz", ".bz", ".bz2", ".xz", ".zst")


def tokens_to_row(tokens: list[int]) -> dict:
    """An InternLM ``tokens`` list -> ``input_ids`` (absolute values) and ``labels`` (non-positive: ignored)."""
    return {"input_ids": [abs(t) for t in tokens], "labels": [t if t > 0 else IGNORE_INDEX for t in tokens],
            "length": len(tokens)}


class TokenizedFile(torch.utils.data.Dataset):
    """The samples of one InternLM tokenized file, read on demand through a memory map."""

    column_names = ["input_ids", "labels", "length"]

    def __init__(self, path: str | os.PathLike, min_length: int = 0) -> None:
        self.path = str(path)
        if self.path.endswith(COMPRESSED_SUFFIXES):
            raise ConfigError(f"{self.path}: compressed tokenized files cannot be read by offset; decompress it")
        offsets, lengths = self._index()
        if min_length > 0:
            keep = lengths >= min_length
            offsets, lengths = offsets[keep], lengths[keep]
        self.offsets, self.lengths = offsets, lengths
        self._map: mmap.mmap | None = None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        meta = Path(self.path + ".meta")
        if meta.is_file():
            with open(meta, "rb") as f:
                table = np.load(f)
            if table.ndim != 2 or table.shape[1] < 2:
                raise ConfigError(f"{meta}: expected a (samples, 2+) array of byte offsets and lengths, "
                                  f"got shape {table.shape}")
            return table[:, 0].astype(np.int64), table[:, -1].astype(np.int64)
        offsets: list[int] = []
        lengths: list[int] = []
        position = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(position)
                    lengths.append(len(self._tokens(line, f"line {number}")))
                position += len(line)
        return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    def _tokens(self, line: bytes, where: str) -> list[int]:
        try:
            tokens = json.loads(line)["tokens"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}, {where}: not a JSON object with a 'tokens' list "
                              f"({type(exc).__name__}: {exc})") from None
        if not isinstance(tokens, list):
            raise ConfigError(f"{self.path}, {where}: 'tokens' is a {type(tokens).__name__}, not a list")
        return tokens

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start = int(self.offsets[index])
        end = self._map.find(b"\n", start)
        line = self._map[start:] if end < 0 else self._map[start:end]
        row = tokens_to_row(self._tokens(line, f"byte {start}"))
        if row["length"] != self.lengths[index]:
            raise ConfigError(f"{self.path}, byte {start}: the sample has {row['length']} tokens but the index "
                              f"says {self.lengths[index]} (is {self.path}.meta stale? delete it to re-index)")
        return row

    def __getstate__(self) -> dict:  # DataLoader workers map the file themselves
        return {**self.__dict__, "_map": None}


def _data_files(folder: str, data_order_path: str | None, file_type: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ConfigError(f"the dataset folder {folder!r} does not exist")
    if data_order_path is not None:
        with open(data_order_path, encoding="utf-8") as f:
            files = [os.path.join(folder, line.strip()) for line in f if line.strip()]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"{data_order_path} lists {len(missing)} file(s) not found in {folder}: {missing[:3]}")
        return files
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(file_type)]
    if not files:
        raise ConfigError(f"no *{file_type} files under {folder}")
    return files


def load_intern_repo_tokenized_dataset(folder: str, min_length: int = 0, data_order_path: str | None = None,
                                       file_type: str = ".bin") -> list[TokenizedFile]:
    """The tokenized files under ``folder`` (sorted, recursively) or listed in ``data_order_path``
    (paths relative to ``folder``, one a line), one dataset each; samples shorter than
    ``min_length`` tokens are left out, files left empty are skipped."""
    datasets = []
    for path in _data_files(folder, data_order_path, file_type):
        dataset = TokenizedFile(path, min_length=min_length)
        logger.info(f"Read {path}: {len(dataset)} samples")
        if len(dataset):
            datasets.append(dataset)
    if not datasets:
        raise ConfigError(f"no samples of at least {min_length} tokens in the *{file_type} files under {folder}")
    return datasets


def read_messages_file(path: str):
    """A chat file (one JSON list of messages a line, or an object with ``messages``) as a Dataset."""
    from datasets import Dataset

    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}, line {number}: not JSON ({exc})") from None
            if isinstance(value, dict) and "messages" in value:
                value = value["messages"]
            if not isinstance(value, list):
                raise ConfigError(f"{path}, line {number}: expected a list of messages, got {type(value).__name__}")
            rows.append({"messages": value})
    return Dataset.from_list(rows)


def load_intern_repo_untokenized_dataset(processed_dataset_dict_path: str | None = None, folder: str | None = None,
                                         tokenizer: Any = None, max_length: int | None = None,
                                         template_map_fn: Any = None, data_order_path: str | None = None,
                                         file_type: str = ".json", map_num_proc: int | None = None) -> list:
    """Chat files under ``folder`` tokenized one dataset per file (with ``openai_map_fn`` and
    ``template_map_fn``, cut to ``max_length``, not packed), or the datasets saved under
    ``processed_dataset_dict_path`` (a DatasetDict keyed ``'0'``, ``'1'``... in order)."""
    if processed_dataset_dict_path is not None:
        from datasets import load_from_disk

        saved = load_from_disk(processed_dataset_dict_path)
        try:
            return [saved[k] for k in sorted(saved, key=int)]
        except ValueError:
            raise ConfigError(f"{processed_dataset_dict_path}: expected splits named 0, 1, ... "
                              f"got {list(saved)}") from None
    if not (folder and tokenizer is not None and max_length):
        raise ConfigError("load_intern_repo_untokenized_dataset needs processed_dataset_dict_path, or folder, "
                          "tokenizer and max_length")
    from lmtune.dataset.huggingface import process_hf_dataset
    from lmtune.dataset.map_fns import openai_map_fn

    datasets = []
    for path in _data_files(folder, data_order_path, file_type):
        if os.path.getsize(path) == 0:
            continue
        datasets.append(process_hf_dataset(
            dict(type=read_messages_file, path=path), tokenizer=tokenizer, max_length=max_length,
            dataset_map_fn=openai_map_fn, template_map_fn=template_map_fn, pack_to_max_length=False,
            map_num_proc=map_num_proc))
    if not datasets:
        raise ConfigError(f"the *{file_type} files under {folder} are all empty")
    return datasets


def _lengths(dataset: Any) -> np.ndarray:
    if isinstance(getattr(dataset, "lengths", None), np.ndarray):
        return dataset.lengths
    if "length" in getattr(dataset, "column_names", []) and hasattr(dataset, "with_format"):
        return np.asarray(dataset.with_format("numpy", columns=["length"])["length"], dtype=np.int64)
    return np.asarray([len(dataset[i]["input_ids"]) for i in range(len(dataset))], dtype=np.int64)


class PackedDataset(torch.utils.data.Dataset):
    """``dataset``'s samples, shuffled with ``seed``, concatenated and cut into rows of ``packed_length``
    tokens (the incomplete last row is dropped). A row is assembled when read."""

    column_names = ["input_ids", "labels", "num_tokens", "length"]

    def __init__(self, dataset: Any, packed_length: int = 8192, seed: int = 1024) -> None:
        if packed_length <= 0:
            raise ConfigError(f"packed_length must be positive, got {packed_length}")
        self.dataset = dataset
        self.packed_length = int(packed_length)
        self.seed = seed
        lengths = _lengths(dataset)
        self.order = np.random.RandomState(seed).permutation(len(lengths))
        self.sample_lengths = lengths[self.order]
        self.ends = np.cumsum(self.sample_lengths)  # token offset where each (shuffled) sample ends
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return self.num_tokens // self.packed_length

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a packed dataset of {len(self)} rows")
        start = index * self.packed_length
        k = int(np.searchsorted(self.ends, start, side="right"))  # the sample holding token `start`
        offset = start - (int(self.ends[k - 1]) if k else 0)
        ids: list[int] = []
        labels: list[int] = []
        pieces: list[int] = []
        while len(ids) < self.packed_length:
            take = min(int(self.sample_lengths[k]) - offset, self.packed_length - len(ids))
            if take > 0:
                sample = self.dataset[int(self.order[k])]
                if len(sample["input_ids"]) != self.sample_lengths[k]:
                    raise ConfigError(f"sample {int(self.order[k])} has {len(sample['input_ids'])} tokens, "
                                      f"but its recorded length is {int(self.sample_lengths[k])}")
                ids += sample["input_ids"][offset:offset + take]
                labels += [IGNORE_INDEX] + list(sample["labels"][offset + 1:offset + take])
                pieces.append(take)
            k, offset = k + 1, 0
        return {"input_ids": ids, "labels": labels, "num_tokens": pieces, "length": len(ids)}


def build_packed_dataset(dataset_cfg: Any, packed_length: int = 8192, seed: int = 1024) -> ConcatDataset:
    """Pack each dataset ``dataset_cfg`` builds to (a dataset or a list of them, e.g. from
    ``load_intern_repo_tokenized_dataset``) into rows of ``packed_length`` tokens, one after another."""
    built = build(dataset_cfg, key="train_dataset.dataset_cfg")
    if not isinstance(built, (list, tuple)):
        built = [built]
    packed = [PackedDataset(d, packed_length, seed=seed) for d in built]
    total = sum(p.num_tokens for p in packed)
    rows = sum(len(p) for p in packed)
    if not rows:
        raise ConfigError(f"the dataset has {total} tokens, not enough for one packed row of {packed_length}: "
                          "lower packed_length (max_length) or add data")
    logger.info(f"Packed {total} tokens of {len(packed)} dataset(s) into {rows} rows of {packed_length} tokens "
                f"({total - rows * packed_length} tokens of incomplete last rows left out)")
    return ConcatDataset(packed)
