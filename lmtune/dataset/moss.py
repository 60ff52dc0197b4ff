"""``MOSSSFTDataset``: the moss-003-sft data (fnlp/moss-003-sft-data) as tokenized rows.

Each line of a data file is one conversation::

    {"meta_instruction": "...", "num_turns": 2,
     "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\\n", "MOSS": "<|MOSS|>: ...<eom>\\n"},
              "turn_2": {"Human": ..., "Inner Thoughts": ..., "Commands": ...,
                         "Tool Responses": "<|Results|>: ...<eor>\\n", "MOSS": ...}}}

A row is the meta instruction (tokenized with the tokenizer's special tokens) followed by
every part of every turn in file order (each tokenized on its own, without special tokens),
with ``bot_name`` written for "MOSS" in all of the text when given. As in XTuner, the labels
ignore the meta instruction and what a tool returned (a Tool Responses part keeps only its
``<|Results|>:`` and ``<eor>\\n`` format tokens); everything else is trained, the human
turns included. ``bot_only_loss=True`` trains only what the bot writes: its inner
thoughts, commands and replies.

Turns are added while the row stays within ``max_length`` tokens; the first turn that
would not fit ends the row, and a conversation whose first turn does not fit is left
out. A conversation with a missing field or an empty part is left out too (XTuner skips
it silently; lmtune counts it in the log). Rows are not packed; nothing is appended to
them (no EOS): the data's own ``<eom>`` markers end the replies.

The tokenized rows are cached like ``process_hf_dataset``'s (keyed by the file, the
tokenizer and the options); with several ranks, rank 0 prepares them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from lmtune.config.build import build
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.dist import get_rank, is_distributed
from lmtune.core.errors import ConfigError
from lmtune.dataset import cache

logger = logging.getLogger("lmtune")

FORMAT_VERSION = 1  # part of the cache key: bump when the rows this module makes change
TOOL_KEY, HUMAN_KEY = "Tool Responses", "Human"
RESULTS_PREFIX, RESULTS_SUFFIX = "<|Results|>:", "<eor>\n"
LINES_PER_BATCH = 1000


class _Skip(Exception):
    """A conversation that is left out, and why."""


class MOSSSFTDataset(torch.utils.data.Dataset):
    """Rows of ``input_ids`` and ``labels`` (and ``length``) from a moss-003-sft jsonl file.

    ``tokenizer``: a tokenizer or its config dict. ``max_length``: the longest row (None: no
    limit). ``bot_name``: replaces "MOSS" in the meta instruction and the turns.
    ``bot_only_loss``: also keep the human turns and whole tool responses out of the loss
    (lmtune's option; XTuner trains them). ``use_cache``: keep the tokenized rows on disk.
    """

    def __init__(self, data_file: str, tokenizer: Any, max_length: int | None = 2048, bot_name: str | None = None,
                 bot_only_loss: bool = False, use_cache: bool = True, dataset_wait_timeout: float = 3600) -> None:
        super().__init__()
        self.data_file = str(data_file)
        self.tokenizer = build(tokenizer, key="MOSSSFTDataset.tokenizer")
        self.max_length = max_length
        self.bot_name = bot_name
        self.bot_only_loss = bot_only_loss
        self.data = self._load(use_cache, dataset_wait_timeout)

    # -- building ----------------------------------------------------------
    def _load(self, use_cache: bool, timeout: float):
        key = None
        if use_cache:
            key = cache.cache_key(kind="moss_sft", version=FORMAT_VERSION, data_file=self.data_file,
                                  tokenizer=cache.tokenizer_signature(self.tokenizer), max_length=self.max_length,
                                  bot_name=self.bot_name, bot_only_loss=self.bot_only_loss)
            found = cache.load(key)
            if found is None and is_distributed() and get_rank() != 0:
                found = cache.wait_for(key, timeout)
            if found is not None:
                logger.info(f"Loaded the tokenized MOSS data of {self.data_file} from cache "
                            f"({cache.cache_root() / key})")
                self._log(found[1])
                return found[0]
        data, stats = self._tokenize()
        self._log(stats)
        if key is not None and get_rank() == 0:
            cache.save(key, data, stats)
            found = cache.load(key)  # memory-map the saved copy
            if found is not None:
                data = found[0]
        return data

    def _tokenize(self):
        import pyarrow as pa
        from datasets import Dataset

        try:
            f = open(self.data_file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"MOSSSFTDataset: cannot read data_file {self.data_file!r}: {exc.strerror}") from None
        pre = len(self.tokenizer.encode(RESULTS_PREFIX, add_special_tokens=False))
        post = len(self.tokenizer.encode(RESULTS_SUFFIX, add_special_tokens=False))
        tables = []
        stats: dict[str, Any] = {"rows": 0, "samples": 0, "malformed": 0, "too_long": 0, "truncated": 0}
        with f:
            batch: list[tuple[int, str]] = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    batch.append((number, line))
                if len(batch) == LINES_PER_BATCH:
                    tables.append(self._encode_batch(batch, pre, post, stats))
                    batch = []
            if batch:
                tables.append(self._encode_batch(batch, pre, post, stats))
        if not stats["samples"]:
            raise ConfigError(self._empty_reason(stats))
        return Dataset(pa.concat_tables(tables)), stats

    def _parse(self, number: int, line: str) -> tuple[str, list[list[tuple[str, str]]]]:
        try:
            sample = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"MOSSSFTDataset: {self.data_file}, line {number} is not JSON ({exc})") from None
        try:
            meta = sample["meta_instruction"]
            turns = [list(sample["chat"][f"turn_{i + 1}"].items()) for i in range(int(sample["num_turns"]))]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _Skip(f"line {number}: {type(exc).__name__}: {exc}") from None
        texts = [meta] + [value for turn in turns for _, value in turn]
        if not all(isinstance(t, str) for t in texts):
            raise _Skip(f"line {number}: a part is not text")
        if self.bot_name is not None:
            meta = meta.replace("MOSS", self.bot_name)
            turns = [[(k, v.replace("MOSS", self.bot_name)) for k, v in turn] for turn in turns]
        return meta, turns

    def _encode_batch(self, batch: list[tuple[int, str]], pre: int, post: int, stats: dict):
        """One batch of lines -> an Arrow table of rows (the texts of the batch tokenized in one call)."""
        import pyarrow as pa

        parsed = []
        for number, line in batch:
            stats["rows"] += 1
            try:
                parsed.append((number, *self._parse(number, line)))
            except _Skip as skip:
                self._count_malformed(stats, str(skip))
        tok = self.tokenizer
        metas = tok([meta for _, meta, _ in parsed], add_special_tokens=True)["input_ids"] if parsed else []
        parts = [v for _, _, turns in parsed for turn in turns for _, v in turn]
        encoded = iter(tok(parts, add_special_tokens=False)["input_ids"] if parts else [])
        columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        for (number, _, turns), meta_ids in zip(parsed, metas):
            turn_ids = [[list(next(encoded)) for _ in turn] for turn in turns]  # consume every part, in order
            try:
                ids, labels = self._assemble(number, list(meta_ids), turns, turn_ids, pre, post, stats)
            except _Skip as skip:
                self._count_malformed(stats, str(skip))
                continue
            if ids is None:
                stats["too_long"] += 1
                continue
            stats["samples"] += 1
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
        ints = pa.list_(pa.int32())
        return pa.table({"input_ids": pa.array(columns["input_ids"], type=ints),
                         "labels": pa.array(columns["labels"], type=ints),
                         "length": pa.array(columns["length"], type=pa.int32())})

    def _assemble(self, number, meta_ids, turns, turn_ids, pre, post, stats):
        """The row of one conversation: ids and labels, or (None, None) when no turn fits."""
        if not meta_ids:
            raise _Skip(f"line {number}: the meta instruction is empty")
        ids, labels = list(meta_ids), [IGNORE_INDEX] * len(meta_ids)
        for turn, part_ids in zip(turns, turn_ids):
            new_ids: list[int] = []
            new_labels: list[int] = []
            for (key, _), part in zip(turn, part_ids):
                if not part:
                    raise _Skip(f"line {number}: the {key!r} part of a turn is empty")
                new_ids += part
                new_labels += self._part_labels(key, part, pre, post)
            if self.max_length is not None and len(ids) + len(new_ids) > self.max_length:
                if len(ids) > len(meta_ids):
                    stats["truncated"] += 1
                break
            ids += new_ids
            labels += new_labels
        if len(ids) == len(meta_ids):
            return None, None
        return ids, labels

    def _part_labels(self, key: str, part: list[int], pre: int, post: int) -> list[int]:
        if key == TOOL_KEY:
            if self.bot_only_loss:
                return [IGNORE_INDEX] * len(part)
            hidden = max(0, len(part) - pre - post)  # between the <|Results|>: and <eor>\n format tokens
            return part[:pre] + [IGNORE_INDEX] * hidden + part[pre + hidden:]
        if key == HUMAN_KEY and self.bot_only_loss:
            return [IGNORE_INDEX] * len(part)
        return list(part)

    @staticmethod
    def _count_malformed(stats: dict, reason: str) -> None:
        stats["malformed"] += 1
        stats.setdefault("first_malformed", reason)

    def _empty_reason(self, stats: dict) -> str:
        where = f"MOSSSFTDataset: {self.data_file}"
        if not stats["rows"]:
            return f"{where} has no rows"
        if stats["too_long"] and not stats["malformed"]:
            return (f"{where}: no conversation's first turn fits in max_length={self.max_length} with its meta "
                    "instruction: raise max_length")
        return (f"{where}: no usable conversation ({stats['malformed']} malformed, e.g. "
                f"{stats.get('first_malformed')}; {stats['too_long']} too long): is it moss-003-sft data?")

    def _log(self, stats: dict) -> None:
        parts = [f"{stats.get('rows', 0)} conversations", f"{stats.get('samples', 0)} samples"]
        if stats.get("truncated"):
            parts.append(f"{stats['truncated']} cut to the turns that fit in max_length={self.max_length}")
        if stats.get("too_long"):
            parts.append(f"{stats['too_long']} left out (first turn longer than max_length={self.max_length})")
        if stats.get("malformed"):
            parts.append(f"{stats['malformed']} malformed and left out (first: {stats.get('first_malformed')})")
        logger.info(f"MOSS data {self.data_file}: " + ", ".join(parts))

    # -- reading -----------------------------------------------------------
    @property
    def column_names(self) -> list[str]:
        return list(self.data.column_names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[index]
