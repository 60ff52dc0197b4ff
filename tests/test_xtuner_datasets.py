"""XTuner's other dataset sources: MOSS SFT data, InternLM-repo files packed to fixed rows,
InternRepoSampler and process_ms_dataset, built directly and from XTuner-shaped configs."""

from __future__ import annotations

import json
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmtune.config import Config, ConfigError, build
from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset import (
    MOSSSFTDataset,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
    load_intern_repo_untokenized_dataset,
    process_hf_dataset,
    process_ms_dataset,
)
from lmtune.dataset import modelscope as ms_module
from lmtune.dataset import samplers as samplers_module
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.intern_repo import PackedDataset
from lmtune.dataset.packing import concat_cut_batch
from lmtune.dataset.samplers import DefaultSampler, InternRepoSampler

IGN = IGNORE_INDEX


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- MOSS

TOOL_TURN = {
    "Human": "<|Human|>: Search for Paris<eoh>\n",
    "Inner Thoughts": "<|Inner Thoughts|>: I should search<eot>\n",
    "Commands": "<|Commands|>: Search(\"Paris\")<eoc>\n",
    "Tool Responses": "<|Results|>: Paris is the capital of France<eor>\n",
    "MOSS": "<|MOSS|>: Paris is in France.<eom>\n",
}
MOSS_ROWS = [
    {"conversation_id": 1, "meta_instruction": "You are MOSS, a helpful assistant.\n", "num_turns": 2,
     "chat": {"turn_1": {"Human": "<|Human|>: Hello, how are you?<eoh>\n", "MOSS": "<|MOSS|>: I am fine.<eom>\n"},
              "turn_2": TOOL_TURN}},
    {"conversation_id": 2, "meta_instruction": "MOSS is kind.\n", "num_turns": 1,
     "chat": {"turn_1": {"Human": "<|Human|>: Say hello.<eoh>\n", "MOSS": "<|MOSS|>: Hello!<eom>\n"}}},
    # malformed (XTuner leaves these out too): an empty part, a missing turn
    {"meta_instruction": "x", "num_turns": 1, "chat": {"turn_1": {"Human": "<|Human|>: a<eoh>\n", "MOSS": ""}}},
    {"meta_instruction": "x", "num_turns": 2, "chat": {"turn_1": {"Human": "h", "MOSS": "m"}}},
]


@pytest.fixture
def moss_file(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "moss.jsonl", MOSS_ROWS))


def expected_moss(tok, row: dict, bot_name: str | None, bot_only: bool) -> tuple[list[int], list[int]]:
    """Independently of the dataset code: meta ids with special tokens, then each part on its own."""
    def text(s):
        return s.replace("MOSS", bot_name) if bot_name else s

    ids = tok.encode(text(row["meta_instruction"]))
    labels = [IGN] * len(ids)
    pre = len(tok.encode("<|Results|>:", add_special_tokens=False))
    post = len(tok.encode("<eor>\n", add_special_tokens=False))
    for t in range(row["num_turns"]):
        for key, value in row["chat"][f"turn_{t + 1}"].items():
            part = tok.encode(text(value), add_special_tokens=False)
            ids += part
            if key == "Tool Responses" and bot_only:
                labels += [IGN] * len(part)
            elif key == "Tool Responses":
                labels += part[:pre] + [IGN] * (len(part) - pre - post) + part[-post:]
            elif key == "Human" and bot_only:
                labels += [IGN] * len(part)
            else:
                labels += part
    return ids, labels


def trained_text(tok, labels: list[int]) -> str:
    return tok.decode([x for x in labels if x != IGN])


def test_moss_rows_train_all_but_meta_and_tool_results_like_xtuner(tiny_tokenizer, moss_file):
    tok = tiny_tokenizer
    ds = MOSSSFTDataset(data_file=moss_file, tokenizer=tok, max_length=2048, bot_name="Llama2")
    assert len(ds) == 2  # the two malformed conversations are left out
    for i in range(2):
        ids, labels = expected_moss(tok, MOSS_ROWS[i], "Llama2", bot_only=False)
        assert ds[i]["input_ids"] == ids and ds[i]["labels"] == labels
    row = ds[0]
    assert tok.decode(row["input_ids"]).startswith("You are Llama2, a helpful assistant.\n<|Human|>: Hello")
    assert "MOSS" not in tok.decode(row["input_ids"])
    trained = trained_text(tok, row["labels"])
    assert "You are" not in trained  # meta instruction masked
    assert "<|Human|>: Hello, how are you?<eoh>" in trained  # XTuner trains the human turns
    assert "<|Results|>:<eor>\n" in trained and "capital of France" not in trained  # only the format tokens
    assert "<|Llama2|>: Paris is in France.<eom>" in trained


def test_moss_bot_only_loss_masks_human_turns_and_tool_results(tiny_tokenizer, moss_file):
    tok = tiny_tokenizer
    ds = MOSSSFTDataset(data_file=moss_file, tokenizer=tok, max_length=2048, bot_only_loss=True)
    ids, labels = expected_moss(tok, MOSS_ROWS[0], None, bot_only=True)
    assert ds[0]["input_ids"] == ids and ds[0]["labels"] == labels
    assert trained_text(tok, labels) == ("<|MOSS|>: I am fine.<eom>\n<|Inner Thoughts|>: I should search<eot>\n"
                                         "<|Commands|>: Search(\"Paris\")<eoc>\n<|MOSS|>: Paris is in France.<eom>\n")


def test_moss_max_length_keeps_whole_turns_that_fit(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    full_ids, _ = expected_moss(tok, MOSS_ROWS[0], None, bot_only=False)
    first_turn_end = len(tok.encode(MOSS_ROWS[0]["meta_instruction"])) + sum(
        len(tok.encode(v, add_special_tokens=False)) for v in MOSS_ROWS[0]["chat"]["turn_1"].values())
    path = str(write_jsonl(tmp_path / "one.jsonl", MOSS_ROWS[:1]))
    cut = MOSSSFTDataset(path, tok, max_length=len(full_ids) - 1, use_cache=False)
    assert cut[0]["input_ids"] == full_ids[:first_turn_end]  # the second turn did not fit: dropped whole
    whole = MOSSSFTDataset(path, tok, max_length=len(full_ids), use_cache=False)
    assert whole[0]["input_ids"] == full_ids
    with pytest.raises(ConfigError, match="raise max_length"):  # not even the first turn fits
        MOSSSFTDataset(path, tok, max_length=first_turn_end - 1, use_cache=False)


def test_moss_tokenizer_dict_cache_and_batches(tiny_model_dir, tiny_tokenizer, moss_file):
    from transformers import AutoTokenizer

    cfg = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tiny_model_dir)
    first = MOSSSFTDataset(data_file=moss_file, tokenizer=cfg, max_length=2048)
    again = MOSSSFTDataset(data_file=moss_file, tokenizer=cfg, max_length=2048)  # from the cache
    assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    masked = MOSSSFTDataset(data_file=moss_file, tokenizer=cfg, max_length=2048, bot_only_loss=True)
    assert masked[0]["labels"] != first[0]["labels"]  # the option is part of the cache key
    sampler = DefaultSampler(first, shuffle=True, seed=0)
    batch = next(iter(DataLoader(first, batch_size=2, sampler=sampler, collate_fn=default_collate_fn)))
    rows = [first[i] for i in list(sampler)]
    assert batch["input_ids"].shape == (2, max(r["length"] for r in rows))
    assert batch["labels"][0, : rows[0]["length"]].tolist() == rows[0]["labels"]


def test_moss_bad_json_names_the_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MOSS_ROWS[1]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        MOSSSFTDataset(str(path), tiny_tokenizer, use_cache=False)


# ----------------------------------------------------------------------------- InternLM repo data

SAMPLES_A = [[-1, -2, 30, 31], [5, -6, 7], [8, 9, 10, 11, 12]]
SAMPLES_B = [[-40, 41, 42, 43, 44, 45], [50, 51]]


def write_bin(path: Path, samples: list[list[int]], meta: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = []
    with open(path, "wb") as f:
        for tokens in samples:
            offsets.append(f.tell())
            f.write((json.dumps({"tokens": tokens, "type": "chat"}) + "\n").encode())
    if meta:
        with open(str(path) + ".meta", "wb") as f:
            np.save(f, np.array([[o, len(t)] for o, t in zip(offsets, samples)]))


@pytest.fixture
def bin_folder(tmp_path) -> Path:
    write_bin(tmp_path / "data" / "a.bin", SAMPLES_A, meta=True)
    write_bin(tmp_path / "data" / "sub" / "b.bin", SAMPLES_B, meta=False)
    (tmp_path / "data" / "notes.txt").write_text("not data")
    return tmp_path / "data"


def test_tokenized_files_negative_tokens_are_masked_labels(bin_folder):
    a, b = load_intern_repo_tokenized_dataset(str(bin_folder))  # a.bin (with .meta), then sub/b.bin (indexed)
    assert [len(a), len(b)] == [3, 2]
    assert a[0] == {"input_ids": [1, 2, 30, 31], "labels": [IGN, IGN, 30, 31], "length": 4}
    assert a[1] == {"input_ids": [5, 6, 7], "labels": [5, IGN, 7], "length": 3}
    assert b[0] == {"input_ids": [40, 41, 42, 43, 44, 45], "labels": [IGN, 41, 42, 43, 44, 45], "length": 6}
    only_long = load_intern_repo_tokenized_dataset(str(bin_folder), min_length=5)
    assert [d[0]["input_ids"] for d in only_long] == [[8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45]]
    order = bin_folder.parent / "order.txt"
    order.write_text("sub/b.bin\na.bin\n")
    first, _ = load_intern_repo_tokenized_dataset(str(bin_folder), data_order_path=str(order))
    assert first[1]["input_ids"] == [50, 51]
    with pytest.raises(ConfigError, match="does not exist"):
        load_intern_repo_tokenized_dataset(str(bin_folder / "nope"))


def test_packed_rows_cut_the_shuffled_stream_and_restart_positions(bin_folder):
    packed = build_packed_dataset(dict(type=load_intern_repo_tokenized_dataset, folder=str(bin_folder)),
                                  packed_length=4, seed=1024)
    a_rows = 12 // 4  # a.bin: 12 tokens -> 3 rows; b.bin: 8 tokens -> 2 rows
    assert len(packed) == a_rows + 2 and "num_tokens" in packed.column_names
    # a.bin alone, in the seeded order: the same rows as lmtune's concatenate-and-cut packing
    order = np.random.RandomState(1024).permutation(3)
    stream = {"input_ids": [[abs(t) for t in SAMPLES_A[k]] for k in order],
              "labels": [[t if t > 0 else IGN for t in SAMPLES_A[k]] for k in order]}
    reference = concat_cut_batch(stream, max_length=4)
    for i in range(a_rows):
        row = packed[i]
        assert row["length"] == 4 and sum(row["num_tokens"]) == 4
        assert {k: row[k] for k in ("input_ids", "labels", "num_tokens")} == \
            {k: reference[k][i] for k in ("input_ids", "labels", "num_tokens")}
    batch = default_collate_fn([packed[0], packed[1]], use_varlen_attn=True)
    for r in range(2):
        starts = [0] + list(np.cumsum(packed[r]["num_tokens"])[:-1])
        positions = batch["position_ids"][r].tolist()
        assert [j for j, p in enumerate(positions) if p == 0] == starts  # restart at every piece
        assert all(batch["labels"][r, s] == IGN for s in starts)  # no piece is predicted from another
        assert batch["cumulative_len"][r].tolist() == starts + [4]


def test_packed_dataset_of_a_long_sample_and_the_dropped_tail():
    rows = [{"input_ids": list(range(1, 11)), "labels": list(range(1, 11)), "length": 10}]
    packed = PackedDataset(rows, packed_length=4, seed=0)
    assert len(packed) == 2  # 10 tokens: two full rows, the last 2 tokens left out (as XTuner)
    assert packed[1] == {"input_ids": [5, 6, 7, 8], "labels": [IGN, 6, 7, 8], "num_tokens": [4], "length": 4}
    assert packed[-1] == packed[1]
    with pytest.raises(IndexError):
        packed[2]
    with pytest.raises(ConfigError, match="not enough for one packed row"):
        build_packed_dataset([rows], packed_length=64)


def test_untokenized_chat_files_are_templated_and_packed(tiny_model_dir, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lmtune.dataset.map_fns import openai_map_fn, template_map_fn_factory
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(6)]
    write_jsonl(tmp_path / "chat" / "0.json", chats[:3])
    write_jsonl(tmp_path / "chat" / "1.json", [{"messages": m} for m in chats[3:]])
    tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tiny_model_dir)
    template = dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat)
    loaded = load_intern_repo_untokenized_dataset(folder=str(tmp_path / "chat"), tokenizer=tokenizer, max_length=64,
                                                  template_map_fn=template)
    assert [len(d) for d in loaded] == [3, 3]
    same = process_hf_dataset(Dataset.from_list([{"messages": m} for m in chats[:3]]), tokenizer=tokenizer,
                              max_length=64, dataset_map_fn=openai_map_fn, template_map_fn=template,
                              pack_to_max_length=False, use_cache=False)
    assert loaded[0][0]["input_ids"] == same[0]["input_ids"] and loaded[0][0]["labels"] == same[0]["labels"]
    assert trained_text(tiny_tokenizer, loaded[0][1]["labels"]).startswith("Answer 1.")
    packed = build_packed_dataset(loaded, packed_length=16)
    assert len(packed) == sum(sum(d["length"]) // 16 for d in loaded)
    with pytest.raises(ConfigError, match="needs processed_dataset_dict_path, or folder"):
        load_intern_repo_untokenized_dataset(folder=str(tmp_path / "chat"))


# ----------------------------------------------------------------------------- InternRepoSampler


def ranks(monkeypatch, dataset, world: int, cls=InternRepoSampler, **kw) -> list[list[int]]:
    out = []
    monkeypatch.setattr(samplers_module, "data_parallel_world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(samplers_module, "data_parallel_rank", lambda rank=rank: rank)
        sampler = cls(dataset, **kw)
        sampler.set_epoch(2)
        out.append(list(sampler))
    return out


def test_intern_repo_sampler_shards_drops_the_tail_and_follows_xtuner_order(monkeypatch):
    dataset = list(range(10))
    shards = ranks(monkeypatch, dataset, world=3, seed=1024)
    order = np.random.RandomState(1024 + 2).permutation(10).tolist()  # XTuner's order for epoch 2
    assert shards == [order[r:9:3] for r in range(3)]  # 3 rows each; the 10th of the order left out
    assert sorted(sum(shards, [])) == sorted(order[:9])
    assert ranks(monkeypatch, dataset, world=1, shuffle=False) == [dataset]
    assert ranks(monkeypatch, dataset, world=1) == ranks(monkeypatch, dataset, world=1, seed=1024)  # default
    with pytest.raises(ConfigError, match="fewer than the 4 ranks"):
        ranks(monkeypatch, list(range(3)), world=4)


def test_intern_repo_sampler_skip_and_set_epoch_like_default_sampler(monkeypatch):
    dataset = list(range(20))
    for cls in (InternRepoSampler, DefaultSampler):
        sampler = cls(dataset, shuffle=True, seed=7)
        sampler.set_epoch(1)
        full = list(sampler)
        sampler.skip(5)
        assert list(sampler) == full[5:]  # a resumed epoch starts after the rows already seen
        assert list(sampler) == full  # only once
        sampler.set_epoch(2)
        assert list(sampler) != full and sorted(sampler) == sorted(full)
        assert len(sampler) == 20
    built = build(dict(type=InternRepoSampler, shuffle=True, seed=1024), dataset=dataset, seed=5)
    assert built.seed == 1024  # the config's seed wins over the runner's, as for DefaultSampler


# ----------------------------------------------------------------------------- process_ms_dataset


def test_process_ms_dataset_without_modelscope_says_how_to_install(monkeypatch, tiny_model_dir):
    real_find_spec = ms_module.importlib.util.find_spec
    monkeypatch.setattr(ms_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "modelscope" else real_find_spec(name, *a))
    tokenizer = dict(type="transformers.AutoTokenizer.from_pretrained", pretrained_model_name_or_path=tiny_model_dir)
    for dataset in ("damo/MSAgent-Bench", dict(type="modelscope.msdatasets.MsDataset.load", dataset_name="x")):
        with pytest.raises(ConfigError, match="pip install modelscope"):
            build(dict(type=process_ms_dataset, dataset=dataset, tokenizer=tokenizer, max_length=32))


def test_process_ms_dataset_converts_the_split_and_processes_it(tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from transformers import AutoTokenizer

    class FakeMsDataset:  # what MsDataset.load gives: an object with to_hf_dataset()
        def to_hf_dataset(self):
            return Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4)

    tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tiny_model_dir)
    out = process_ms_dataset({"train": FakeMsDataset()}, tokenizer=tokenizer, max_length=64,
                             dataset_map_fn="alpaca", pack_to_max_length=False, use_cache=False)
    assert len(out) == 4 and trained_text(tiny_tokenizer, out[0]["labels"]).startswith("Hi.")
    with pytest.raises(ConfigError, match="no split 'validation'"):
        process_ms_dataset({"train": FakeMsDataset()}, split="validation", tokenizer=tokenizer, max_length=64)
    with pytest.raises(ConfigError, match="unknown key 'train_dataset.max_lenght'"):
        process_ms_dataset({"train": FakeMsDataset()}, tokenizer=tokenizer, max_lenght=64)


# ----------------------------------------------------------------------------- XTuner-shaped configs

XTUNER_CONFIG = """\
from torch.utils.data import BatchSampler
from transformers import AutoTokenizer

from xtuner.dataset import ConcatDataset, MOSSSFTDataset, process_ms_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.intern_repo import (build_packed_dataset, load_intern_repo_tokenized_dataset,
                                        load_intern_repo_untokenized_dataset)
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.dataset.samplers import InternRepoSampler
from xtuner.utils import PROMPT_TEMPLATE

pretrained_model_name_or_path = {model!r}
dataset_folder = {folder!r}
moss_path = {moss!r}
max_length = 8
use_varlen_attn = True
bot_name = 'Llama2'

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
                 trust_remote_code=True, padding_side='right')

train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, data_order_path=None, folder=dataset_folder,
                     min_length=0, file_type='.bin'),
    packed_length=max_length,
    seed=1024)

untokenized_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(type=load_intern_repo_untokenized_dataset, data_order_path=None, folder=dataset_folder,
                     tokenizer=tokenizer, max_length=64,
                     template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
                     file_type='.json'),
    packed_length=16,
    seed=1024)

moss_dataset = dict(type=ConcatDataset, datasets=[
    dict(type=MOSSSFTDataset, data_file=moss_path, bot_name=bot_name, tokenizer=tokenizer, max_length=2048)])

ms_dataset = dict(type=process_ms_dataset, dataset='damo/MSAgent-Bench', tokenizer=tokenizer, max_length=2048)

train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    dataset=train_dataset,
    sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
    batch_sampler=dict(type=BatchSampler, drop_last=True, batch_size=2),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))
"""


def test_xtuner_config_loads_and_builds_its_datasets(tmp_path, bin_folder, moss_file, tiny_model_dir,
                                                     tiny_tokenizer):
    write_jsonl(bin_folder / "chat.json", [[{"role": "user", "content": "Hi?"},
                                            {"role": "assistant", "content": "Hello there."}]] * 4)
    path = tmp_path / "xtuner_style.py"
    path.write_text(textwrap.dedent(XTUNER_CONFIG.format(model=tiny_model_dir, folder=str(bin_folder),
                                                         moss=moss_file)), encoding="utf-8")
    cfg = Config.fromfile(path)
    assert cfg.train_dataset["type"] is build_packed_dataset
    assert cfg.train_dataloader["sampler"]["type"] is InternRepoSampler

    loader_cfg = cfg.train_dataloader
    dataset = build(loader_cfg["dataset"], key="train_dataloader.dataset")
    assert len(dataset) == 12 // 8 + 8 // 8
    sampler = build(loader_cfg["sampler"], key="train_dataloader.sampler", dataset=dataset, seed=0)
    collate = partial(loader_cfg["collate_fn"]["type"], use_varlen_attn=loader_cfg["collate_fn"]["use_varlen_attn"])
    batch = next(iter(DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate)))
    assert batch["input_ids"].shape == (2, 8) and batch["position_ids"].dtype == torch.long
    assert all(len(c) >= 2 for c in batch["cumulative_len"])

    untokenized = build(cfg.untokenized_dataset)
    assert len(untokenized) >= 1 and untokenized[0]["length"] == 16

    moss = build(cfg.moss_dataset)
    assert len(moss) == 2 and moss[0]["num_tokens"] == [moss[0]["length"]]
    assert "Llama2" in tiny_tokenizer.decode(moss[0]["input_ids"])

    if ms_module.importlib.util.find_spec("modelscope") is None:
        with pytest.raises(ConfigError, match="pip install modelscope"):
            build(cfg.ms_dataset)


def test_arguments_datasets_removed_are_replaced_with_one_warning(tmp_path, caplog):
    """XTuner's pgbooks configs pass load_dataset(..., ignore_verifications=True), which datasets 3 removed:
    it runs as verification_mode='no_checks', with a warning naming the key."""
    from datasets import load_dataset

    from lmtune.config import build

    write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": "b"}])
    cfg = dict(type=load_dataset, path="json", data_files=str(tmp_path / "rows.jsonl"), split="train",
               ignore_verifications=True, use_auth_token=None)
    with caplog.at_level("WARNING", logger="lmtune"):
        rows = build(cfg, key="train_dataset.dataset")
    assert rows["text"] == ["a", "b"]
    assert "train_dataset.dataset.ignore_verifications=True is passed as verification_mode='no_checks'" in caplog.text
    assert "use_auth_token=None is passed as token=None" in caplog.text
