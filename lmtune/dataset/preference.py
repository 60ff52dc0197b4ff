"""Preference pairs: a prompt with a chosen and a rejected response -> token ids, labels, and rows of pairs.

    raw row --dataset_map_fn--> {prompt, chosen, rejected} (message lists or strings)
            --PairEncoder--> chosen ids + rejected ids (one row, two segments), labels on the responses
            --pack_pairs--> (with use_varlen_attn) several whole pairs per row, up to max_packed_length

Each response is rendered with the tokenizer's chat template after the shared prompt: the prompt is the
template's generation prompt (tokenized on its own, as the model sees it at inference), the response is the
rest of the rendered conversation, and only the response carries labels. A row lists the lengths of its
sequences in ``num_tokens``, chosen and rejected alternating (and its number of ``pairs``), so the collate
function restarts position ids at each one and every sequence attends only to itself, packed or not.

A reward model (``is_reward=True``) sees each sequence with ``reward_token_id`` appended; its score is read at
that token, which alone carries a label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from lmtune.config.build import build
from lmtune.core.constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.dataset import cache
from lmtune.dataset.chat_template import _require_chat_template
from lmtune.dataset.packing import best_fit_bins
from lmtune.dataset.stages import BAD, NO_TARGET, OK, as_function, describe_source, train_split

logger = logging.getLogger("lmtune")

SAME = 4  # a pair whose chosen and rejected responses are the same: nothing to learn from it
PAIR_STATUS = {OK: "ok", SAME: "dropped: chosen and rejected identical",
               NO_TARGET: "dropped: nothing to train after truncation", BAD: "malformed"}
PAIR_FORMAT = "preference pairs 1"  # in the cache key: a change to the rows' format re-processes cached data


def _messages(value: Any, key: str, role: str) -> list[dict]:
    """A ``prompt`` / ``chosen`` / ``rejected`` value as chat messages (a string is one message of ``role``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"'{key}' message {k} is not a {{'role': ..., 'content': ...}} dict: {message!r:.80}")
        messages.append({"role": str(message["role"]), "content": message["content"]})
    return messages


class PairEncoder:
    """Turns ``{'prompt', 'chosen', 'rejected'}`` rows into one row of two sequences (see the module doc)."""

    def __init__(self, tokenizer: Any, max_length: int, is_reward: bool = False, reward_token_id: int = -1) -> None:
        _require_chat_template(tokenizer)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.is_reward, self.reward_token_id = is_reward, reward_token_id

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _sequence(self, prompt: list[dict], prompt_text: str, prompt_ids: list[int],
                  response: list[dict], key: str) -> tuple[list[int], list[int], bool]:
        full = self._render(prompt + response, False)
        if not full.startswith(prompt_text):
            raise ConfigError(f"the chat template does not write the prompt as the start of the conversation with "
                              f"the '{key}' response, so the response cannot be told apart; check the tokenizer's "
                              "chat_template")
        ids = prompt_ids + self._ids(full[len(prompt_text):])
        if self.is_reward:  # the score is read at the reward token, appended after the (cut) sequence
            cut = len(ids) > self.max_length - 1
            ids = ids[: self.max_length - 1] + [self.reward_token_id]
            return ids, [IGNORE_INDEX] * (len(ids) - 1) + [self.reward_token_id], cut
        cut = len(ids) > self.max_length
        ids = ids[: self.max_length]
        labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        labels[0] = IGNORE_INDEX  # a sequence's first token is never predicted
        return ids, labels, cut

    def __call__(self, row: dict) -> dict:
        """``input_ids``, ``labels``, ``num_tokens`` ([chosen, rejected] lengths), ``length``, ``truncated`` and
        ``status`` (OK, SAME, NO_TARGET); raises ConfigError on a malformed row."""
        missing = [key for key in ("prompt", "chosen", "rejected") if row.get(key) is None]
        if missing:
            raise ConfigError(f"it has no {' / '.join(repr(k) for k in missing)} (fields {sorted(row)}); set "
                              "dataset_map_fn to the function for your data's format")
        prompt = _messages(row["prompt"], "prompt", "user")
        if not prompt or not any(str(m["content"]).strip() for m in prompt):
            raise ConfigError("its prompt is empty")
        chosen, rejected = _messages(row["chosen"], "chosen", "assistant"), _messages(row["rejected"], "rejected",
                                                                                    "assistant")
        for key, response in (("chosen", chosen), ("rejected", rejected)):
            if not response or not any(str(m["content"]).strip() for m in response):
                raise ConfigError(f"its '{key}' response is empty")
        prompt_text = self._render(prompt, True)
        prompt_ids = self._ids(prompt_text)
        c_ids, c_labels, c_cut = self._sequence(prompt, prompt_text, prompt_ids, chosen, "chosen")
        r_ids, r_labels, r_cut = self._sequence(prompt, prompt_text, prompt_ids, rejected, "rejected")
        status = OK
        if any(all(label == IGNORE_INDEX for label in labels) for labels in (c_labels, r_labels)):
            status = NO_TARGET
        elif c_ids == r_ids:
            status = SAME
        return {"input_ids": c_ids + r_ids, "labels": c_labels + r_labels, "num_tokens": [len(c_ids), len(r_ids)],
                "length": len(c_ids) + len(r_ids), "truncated": c_cut or r_cut, "status": status}


def reward_sequence(tokenizer: Any, messages: list[dict], reward_token_id: int, max_length: int = 1 << 30
                    ) -> list[int]:
    """The token ids a reward model trained on ``build_preference_dataset(is_reward=True)`` scores for a
    conversation: its last message is the response, tokenized after the prompt exactly as in training, then the
    reward token."""
    messages = _messages(messages, "messages", "user")
    if len(messages) < 2:
        raise ConfigError("a conversation to score needs a prompt and a response (at least two messages)")
    encoder = PairEncoder(tokenizer, max_length, is_reward=True, reward_token_id=reward_token_id)
    prompt_text = encoder._render(messages[:-1], True)
    return encoder._sequence(messages[:-1], prompt_text, encoder._ids(prompt_text), messages[-1:], "response")[0]


class ReferencePairEncoder:
    """XTuner's POLAR reward data (``is_reference=True``): rows of ``prompt``, ``reference``, ``chosen`` and
    ``rejected`` (and optionally ``wrapper``: 'sft' or 'pretrain'). Each sequence is the prompt with the reference
    answer, ``<|reward|>``, then the prompt with the candidate, as plain text (no chat template), scored at the
    reward token appended to it; the candidate is judged against the reference. Answers beyond
    ``max_response_length`` tokens are cut, and the prompt keeps its last tokens so that a sequence fits
    ``max_length``."""

    MARKER = "<|reward|>"

    def __init__(self, tokenizer: Any, max_length: int, max_response_length: int, reward_token_id: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.max_response_length, self.reward_token_id = max_response_length, reward_token_id

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def __call__(self, row: dict) -> dict:
        missing = [key for key in ("prompt", "reference", "chosen", "rejected") if row.get(key) is None]
        if missing:
            raise ConfigError(f"it has no {' / '.join(repr(k) for k in missing)} (fields {sorted(row)}); POLAR "
                              "reward data (is_reference=True) needs prompt, reference, chosen and rejected")
        texts = {key: "\n".join(str(m["content"]) for m in _messages(row[key], key, "assistant"))
                 for key in ("prompt", "reference", "chosen", "rejected")}
        if not texts["prompt"].strip():
            raise ConfigError("its prompt is empty")
        ids = {key: self._ids(text) for key, text in texts.items()}
        cut = any(len(ids[k]) > self.max_response_length for k in ("reference", "chosen", "rejected"))
        for key in ("reference", "chosen", "rejected"):
            ids[key] = ids[key][: self.max_response_length]
        room = self.max_length - 4  # the reward marker, two separators and the reward token
        prompt_room = max(0, min(room - len(ids["reference"]) - len(ids[k]) for k in ("chosen", "rejected")) // 2)
        if len(ids["prompt"]) > prompt_room:
            cut, ids["prompt"] = True, ids["prompt"][len(ids["prompt"]) - prompt_room:]
        plain = {key: self.tokenizer.decode(value, skip_special_tokens=True) for key, value in ids.items()}
        pretrain = row.get("wrapper") == "pretrain"

        def joined(answer: str) -> str:
            return plain["prompt"] + answer if pretrain or not answer else plain["prompt"] + "\n" + answer

        sequences = []
        for key in ("chosen", "rejected"):
            seq = self._ids(joined(plain["reference"]) + self.MARKER + joined(plain[key])) + [self.reward_token_id]
            sequences.append((seq, [IGNORE_INDEX] * (len(seq) - 1) + [self.reward_token_id]))
        (c_ids, c_labels), (r_ids, r_labels) = sequences
        return {"input_ids": c_ids + r_ids, "labels": c_labels + r_labels, "num_tokens": [len(c_ids), len(r_ids)],
                "length": len(c_ids) + len(r_ids), "truncated": cut, "status": SAME if c_ids == r_ids else OK}


class PairProcessor:
    """The batched function of the first pass: row -> map function -> pair of sequences, with a status."""

    def __init__(self, map_fn, encoder: PairEncoder, source: str, skip_bad_rows: bool) -> None:
        self.map_fn, self.encoder, self.source, self.skip_bad_rows = map_fn, encoder, source, skip_bad_rows

    def encode(self, row: dict, index: int) -> dict:
        """One row (never raises while skipping bad rows: a failure is its status)."""
        stage = "dataset_map_fn"
        try:
            if self.map_fn is not None:
                row = self.map_fn(dict(row))
            if not isinstance(row, dict):
                raise ConfigError(f"it produced a {type(row).__name__}, not a dict")
            stage = "tokenization"
            return self.encoder(row)
        except Exception as exc:  # noqa: BLE001 - reported with the row, or counted when skipping
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            if not self.skip_bad_rows:
                raise ConfigError(f"{stage} failed on row {index} of {self.source}: {error} (set skip_bad_rows=True "
                                  "in train_dataset to skip such rows)") from None
            return {"input_ids": [], "labels": [], "num_tokens": [], "length": 0, "truncated": False, "status": BAD}

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        names = list(batch)
        rows = [self.encode({name: batch[name][k] for name in names}, index) for k, index in enumerate(indices)]
        out = {key: [row[key] for row in rows] for key in ("input_ids", "labels", "num_tokens", "length",
                                                            "truncated", "status")}
        out["pairs"] = [1] * len(rows)  # the pairs of a row: more once packed
        return out


def pair_processor(tokenizer: Any, max_length: int, dataset_map_fn: Any = None, is_reward: bool = False,
                   reward_token_id: int = -1, is_reference: bool = False, max_response_length: int = 4096,
                   source: str = "the dataset", skip_bad_rows: bool = False) -> PairProcessor:
    """The ``PairProcessor`` of a ``build_preference_dataset`` config's settings (``tokenizer`` built)."""
    map_fn = as_function(dataset_map_fn, "train_dataset.dataset_map_fn")
    encoder = (ReferencePairEncoder(tokenizer, max_length, _check_length("max_response_length", max_response_length),
                                    reward_token_id) if is_reference
               else PairEncoder(tokenizer, max_length, is_reward, reward_token_id))
    return PairProcessor(map_fn, encoder, source, skip_bad_rows)


def pack_pairs(batch: dict, max_packed_length: int) -> dict:
    """A ``datasets.map(batched=True)`` function putting whole pairs into rows of at most ``max_packed_length``
    tokens (best-fit decreasing); each row lists its sequences' lengths in ``num_tokens``."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "length": [], "pairs": []}
    for members in best_fit_bins(list(batch["length"]), max_packed_length):
        members.sort()
        out["input_ids"].append([i for m in members for i in batch["input_ids"][m]])
        out["labels"].append([label for m in members for label in batch["labels"][m]])
        out["num_tokens"].append([n for m in members for n in batch["num_tokens"][m]])
        out["length"].append(sum(batch["length"][m] for m in members))
        out["pairs"].append(len(members))
    return out


def _check_length(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"train_dataset.{name} must be an integer of at least 2 tokens, got {value!r}")
    return value


def build_preference_dataset(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    dataset_map_fn: Any = None,
    is_dpo: bool = True,
    is_reward: bool = False,
    reward_token_id: int = -1,
    num_proc: int | None = None,
    use_varlen_attn: bool = False,
    max_packed_length: int = 16384,
    shuffle_before_pack: bool = True,
    max_response_length: int = 4096,
    is_reference: bool = False,
    split: str = "train",
    skip_bad_rows: bool = False,
    use_cache: bool = True,
    seed: int = 0,
    dataset_wait_timeout: float = 3600,
    holdout: dict | None = None,
):
    """The dataset of preference pairs for ``DPO``, ``ORPO``, ``SimPO`` or ``RewardModel``.

    ``dataset``: a ``datasets`` Dataset or a config dict (``dict(type=load_dataset, path=...)``; a local jsonl
    through ``load_dataset('json', data_files=...)`` or ``load_jsonl_dataset``). ``dataset_map_fn`` turns a row into
    ``{'prompt', 'chosen', 'rejected'}``: message lists or strings, the prompt shared by both responses.
    ``is_dpo`` / ``is_reward``: a policy's pairs (responses trained) or a reward model's (a reward token
    appended); ``is_reference=True``: XTuner's POLAR reward data (``ReferencePairEncoder``, answers cut at
    ``max_response_length`` tokens). ``use_varlen_attn``: pack whole pairs into rows of ``max_packed_length``
    tokens (pairs longer than that are dropped and counted). Sequences longer than ``max_length`` are cut; pairs
    with nothing left to train and pairs whose responses are identical are dropped and counted; a malformed row
    stops with its number (or is skipped and counted with ``skip_bad_rows=True``). ``num_proc``: processes for
    tokenizing. The result is cached like SFT data (``use_cache``).
    """
    if is_dpo == is_reward:
        raise ConfigError(f"train_dataset: exactly one of is_dpo and is_reward must be True (got is_dpo={is_dpo}, "
                          f"is_reward={is_reward})")
    if is_reward and (isinstance(reward_token_id, bool) or not isinstance(reward_token_id, int)
                      or reward_token_id < 0):
        raise ConfigError("train_dataset.reward_token_id must be set (a token id the tokenizer has, for example an "
                          f"unused special token) when is_reward=True; got {reward_token_id!r}")
    if is_reference and not is_reward:
        raise ConfigError("train_dataset.is_reference=True (POLAR reward data) needs is_reward=True")
    max_length = _check_length("max_length", max_length)
    if use_varlen_attn:
        max_packed_length = _check_length("max_packed_length", max_packed_length)
    tok = build(tokenizer, key="tokenizer")
    source = describe_source(dataset)
    processor = pair_processor(tok, max_length, dataset_map_fn, is_reward, reward_token_id, is_reference,
                               max_response_length, source, skip_bad_rows)
    map_fn = processor.map_fn
    return cache.prepared(
        dataset, use_cache, dataset_wait_timeout,
        lambda: _process(dataset, split, processor, source, max_length, use_varlen_attn, max_packed_length,
                         shuffle_before_pack, num_proc, seed, holdout),
        lambda stats: _log_stats(source, stats),
        kind=PAIR_FORMAT, split=split, tokenizer=cache.tokenizer_signature(tok), map_fn=map_fn,
        max_length=max_length, is_reward=is_reward, reward_token_id=reward_token_id,
        reference=max_response_length if is_reference else None,
        pack=max_packed_length if use_varlen_attn else None, shuffle_before_pack=shuffle_before_pack,
        skip_bad_rows=skip_bad_rows, seed=seed, **({"holdout": holdout} if holdout else {}))


def _process(dataset, split, processor, source, max_length, pack, max_packed_length, shuffle_before_pack,
             num_proc, seed, holdout=None):
    import numpy as np

    from lmtune.dataset.holdout import holdout_rows

    dataset = train_split(build(dataset, key="train_dataset.dataset"), split)
    if holdout:
        dataset = holdout_rows(dataset, holdout, source)
    stats: dict[str, Any] = {"rows": len(dataset), "max_length": max_length}
    # never datasets' own cache of map results: it is keyed by the processor's state, not lmtune's code
    dataset = dataset.map(processor, batched=True, batch_size=1000, with_indices=True, load_from_cache_file=False,
                          remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing pairs")
    status = np.asarray(dataset["status"])
    stats.update(bad=int((status == BAD).sum()), same=int((status == SAME).sum()),
                 no_target=int((status == NO_TARGET).sum()), truncated=int(np.asarray(dataset["truncated"]).sum()))
    if pack:
        long = np.asarray(dataset["length"]) > max_packed_length
        stats["too_long"] = int((long & (status == OK)).sum())
        status = np.where(long, -1, status)
    keep = np.nonzero(status == OK)[0]
    dataset = dataset.select(keep).remove_columns(["status", "truncated"])
    stats["pairs"] = len(dataset)
    if len(dataset) == 0:
        raise ConfigError(f"no pair of {source} is left to train on ({_describe(stats, max_length)})")
    if pack:
        if shuffle_before_pack:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.map(pack_pairs, batched=True, batch_size=10_000, remove_columns=dataset.column_names,
                              fn_kwargs={"max_packed_length": max_packed_length},
                              desc=f"Packing pairs to {max_packed_length} tokens")
        lengths = np.asarray(dataset["length"])
        stats.update(packed_rows=len(dataset), fill_rate=float(lengths.sum()) / max(len(dataset) * max_packed_length,
                                                                                     1))
    return dataset, stats


def _describe(stats: dict, max_length: int | None) -> str:
    parts = [f"{stats.get('rows', 0)} rows"]
    for key, text in (("bad", "malformed and skipped"), ("same", "dropped: chosen and rejected identical"),
                      ("truncated", f"longer than max_length={max_length} (truncated)"),
                      ("no_target", "dropped: nothing to train after truncation"),
                      ("too_long", "dropped: longer than max_packed_length")):
        if stats.get(key):
            parts.append(f"{stats[key]} {text}")
    return ", ".join(parts)


def _log_stats(source: str, stats: dict) -> None:
    text = _describe(stats, stats.get("max_length")) + f", {stats.get('pairs', 0)} pairs"
    if "packed_rows" in stats:
        text += f" packed into {stats['packed_rows']} rows (fill rate {100 * stats['fill_rate']:.1f}%)"
    logger.info(f"Preference dataset {source}: {text}")


# ------------------------------------------------------------------ batching


def preference_collate_fn(instances: Sequence[dict], pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
                          return_hf_format: bool = False, use_varlen_attn: bool = False) -> dict:
    """Rows of pairs -> a batch with ``sequence_index`` (chosen 2k, rejected 2k + 1 of the batch's pair k; -1 on
    padding) beside ``input_ids``, ``labels`` and ``position_ids`` (restarting at every sequence).

    ``use_varlen_attn``: each row stays one batch row (its pairs packed); otherwise each sequence becomes its own
    row, right-padded. Either way every sequence attends only to itself, so both give the same loss.
    ``return_hf_format`` is accepted for XTuner configs; the batch is always a flat dict of tensors.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, sequence lengths
    for row in instances:
        lengths = list(row["num_tokens"])
        if len(lengths) % 2:
            raise ConfigError("a preference row must hold chosen/rejected pairs (an even number of sequences); "
                              "was the dataset built with build_preference_dataset?")
        if use_varlen_attn:
            rows.append((list(row["input_ids"]), list(row["labels"]), lengths))
            continue
        start = 0
        for n in lengths:
            rows.append((list(row["input_ids"][start:start + n]), list(row["labels"][start:start + n]), [n]))
            start += n
    longest = max(len(ids) for ids, _, _ in rows)
    input_ids, labels, positions, sequences, cumulative, max_seqlen = [], [], [], [], [], []
    number = 0
    for ids, row_labels, lengths in rows:
        pad = longest - len(ids)
        input_ids.append(ids + [pad_index] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        segments = lengths + ([pad] if pad else [])
        positions.append([p for n in segments for p in range(n)])
        index: list[int] = []
        for n in lengths:
            index += [number] * n
            number += 1
        sequences.append(index + [-1] * pad)
        if use_varlen_attn:
            cumulative.append(torch.tensor([0] + segments).cumsum(0).to(torch.int32))
            max_seqlen.append(max(segments))
    batch = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
             "labels": torch.tensor(labels, dtype=torch.long),
             "position_ids": torch.tensor(positions, dtype=torch.long),
             "sequence_index": torch.tensor(sequences, dtype=torch.long)}
    if use_varlen_attn:
        batch["cumulative_len"], batch["max_seqlen"] = cumulative, max_seqlen
    return batch


# ------------------------------------------------------------------ XTuner's loaders and map functions


def load_jsonl_dataset(data_files: str | list[str] | None = None, data_dir: str | None = None,
                       suffix: str | None = None):
    """The rows of local jsonl files (``data_files``, or the files of ``data_dir`` ending in ``suffix``)."""
    import os

    from lmtune.dataset.loading import load_dataset

    if (data_files is None) == (data_dir is None):
        raise ConfigError("load_jsonl_dataset needs exactly one of data_files and data_dir")
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise ConfigError(f"load_jsonl_dataset: data_dir {data_dir!r} is not a directory")
        data_files = sorted(os.path.join(data_dir, name) for name in os.listdir(data_dir)
                            if suffix is None or name.endswith(suffix))
        if not data_files:
            raise ConfigError(f"load_jsonl_dataset: {data_dir!r} holds no file ending in {suffix!r}")
    return load_dataset("json", data_files=data_files, split="train")


def orpo_dpo_mix_40k_map_fn(example: dict) -> dict:
    """Rows whose ``chosen`` and ``rejected`` are whole conversations sharing all but the last message
    (mlabonne/orpo-dpo-mix-40k, argilla/ultrafeedback-binarized-preferences-cleaned)."""
    chosen, rejected = example.get("chosen"), example.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ConfigError("orpo_dpo_mix_40k_map_fn needs 'chosen' and 'rejected' message lists")
    if len(chosen) != len(rejected):
        raise ConfigError(f"'chosen' has {len(chosen)} messages and 'rejected' {len(rejected)}: they must share "
                          "the prompt and differ in the last message")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def intel_orca_dpo_map_fn(example: dict) -> dict:
    """Intel/orca_dpo_pairs rows: ``system``, ``question``, ``chosen``, ``rejected`` strings."""
    prompt = [{"role": "system", "content": example["system"]}, {"role": "user", "content": example["question"]}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": example["chosen"]}],
            "rejected": [{"role": "assistant", "content": example["rejected"]}]}


__all__ = ["PAIR_STATUS", "PairEncoder", "PairProcessor", "ReferencePairEncoder", "build_preference_dataset",
           "intel_orca_dpo_map_fn", "load_jsonl_dataset", "orpo_dpo_mix_40k_map_fn", "pack_pairs", "pair_processor",
           "preference_collate_fn", "reward_sequence"]
