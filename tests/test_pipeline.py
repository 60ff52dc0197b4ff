"""process_hf_dataset as a whole: caching, counting, packing strategies, mixing, pre-tokenized data."""

from __future__ import annotations

import logging
import os
import time

import pytest
from conftest import write_jsonl
from datasets import load_dataset

from lmtune.config import ConfigError
from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset import ConcatDataset, process_hf_dataset
from lmtune.dataset import cache as dcache
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.map_fns import alpaca_map_fn, oasst1_map_fn, template_map_fn_factory
from lmtune.dataset.templates import PROMPT_TEMPLATE

QWEN = PROMPT_TEMPLATE.qwen_chat


def alpaca_cfg(path, tokenizer_dir, **kwargs):
    from transformers import AutoTokenizer

    cfg = dict(dataset=dict(type=load_dataset, path="json", data_files=str(path)),
               tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tokenizer_dir),
               max_length=64, dataset_map_fn=alpaca_map_fn,
               template_map_fn=dict(type=template_map_fn_factory, template=QWEN))
    cfg.update(kwargs)
    return cfg


def rows_of(ds):
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_run_loads_the_cache_and_inputs_invalidate_it(tmp_path, tiny_model_dir, alpaca_file, cache_dir,
                                                             monkeypatch):
    first = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir))
    entries = list((cache_dir / "datasets").iterdir())
    assert len(entries) == 1 and (entries[0] / dcache.DONE).is_file()

    calls = []
    monkeypatch.setattr("lmtune.dataset.huggingface._process", lambda *a, **k: calls.append(1))
    start = time.perf_counter()
    again = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir))
    assert time.perf_counter() - start < 2 and not calls
    assert rows_of(again) == rows_of(first)
    monkeypatch.undo()
    monkeypatch.setenv("LMTUNE_CACHE", str(cache_dir))

    process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, max_length=48))  # another max_length
    process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, template_map_fn=dict(
        type=template_map_fn_factory, template=PROMPT_TEMPLATE.default)))  # another template
    time.sleep(0.01)
    with open(alpaca_file, "a") as fh:  # the data file changes
        fh.write('{"instruction": "New row.", "input": "", "output": "Yes."}\n')
    os.utime(alpaca_file)
    changed = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, pack_to_max_length=False))
    assert len(list((cache_dir / "datasets").iterdir())) == 4
    assert sum(1 for _ in changed) == 16  # 18 rows, 3 '<nooutput>' dropped, 1 added


def test_counts_truncation_and_dropped_rows(tmp_path, tiny_model_dir, cache_dir, caplog):
    rows = [{"instruction": "Say it.", "input": "", "output": "word " * 80},   # truncated, keeps targets
            {"instruction": "word " * 80, "input": "", "output": "lost"},     # truncated inside the prompt
            {"instruction": "Fine.", "input": "", "output": "Yes."},
            {"instruction": "Nothing.", "input": "", "output": "<nooutput>"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="lmtune"):
        ds = process_hf_dataset(**alpaca_cfg(path, tiny_model_dir, pack_to_max_length=False))
    assert len(ds) == 2
    message = next(r.message for r in caplog.records if r.message.startswith("Dataset "))
    assert "4 rows" in message and "1 dropped by the map function" in message
    assert "2 longer than max_length (truncated)" in message
    assert "1 dropped: nothing to train after truncation" in message
    assert all(len(r["input_ids"]) <= 64 for r in ds)


def test_bad_rows_stop_the_run_or_are_skipped_and_counted(tmp_path, tiny_model_dir, cache_dir, caplog):
    rows = [{"instruction": "Fine.", "input": "", "output": "Yes."}, {"instruction": "No answer field."},
            {"instruction": "Fine too.", "input": "", "output": "Ok."}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=r"row 1 of .*bad\.jsonl.*'output'.*skip_bad_rows"):
        process_hf_dataset(**alpaca_cfg(path, tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="lmtune"):
        ds = process_hf_dataset(**alpaca_cfg(path, tiny_model_dir, skip_bad_rows=True, pack_to_max_length=False))
    assert len(ds) == 2
    assert any("1 malformed and skipped" in r.message for r in caplog.records)


def test_an_empty_result_names_the_stage(tmp_path, tiny_model_dir, cache_dir):
    path = write_jsonl(tmp_path / "none.jsonl", [{"instruction": "x", "input": "", "output": "<nooutput>"}] * 3)
    with pytest.raises(ConfigError, match="dataset_map_fn dropped every row"):
        process_hf_dataset(**alpaca_cfg(path, tiny_model_dir))
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "w " * 200, "input": "", "output": "a"}])
    with pytest.raises(ConfigError, match="after truncation to max_length=64"):
        process_hf_dataset(**alpaca_cfg(long_prompt, tiny_model_dir))


def test_concat_strategy_fills_rows_and_keeps_every_token(tmp_path, tiny_model_dir, alpaca_file, cache_dir):
    plain = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, pack_to_max_length=False,
                                            max_length=200))
    packed = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, pack_strategy="concat", max_length=200,
                                             shuffle_before_pack=False))
    lengths = [len(r["input_ids"]) for r in packed]
    assert len(lengths) > 2 and all(n == 200 for n in lengths[:-1]) and 0 < lengths[-1] <= 200
    assert any(len(r["num_tokens"]) > 1 for r in packed)
    assert sum(lengths) == sum(len(r["input_ids"]) for r in plain)
    assert [t for r in packed for t in r["input_ids"]] == [t for r in plain for t in r["input_ids"]]
    for row in packed:
        assert sum(row["num_tokens"]) == len(row["input_ids"])
        start = 0
        for n in row["num_tokens"]:  # every segment start is unlabelled
            assert row["labels"][start] == IGNORE_INDEX
            start += n
    with pytest.raises(ConfigError, match="pack_strategy"):
        process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, pack_strategy="zip"))


def test_best_fit_packing_is_reproducible_and_reports_fill_rate(tmp_path, tiny_model_dir, alpaca_file, cache_dir,
                                                                caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="lmtune"):
        a = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, use_cache=False, seed=5))
    b = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, use_cache=False, seed=5))
    assert rows_of(a) == rows_of(b)
    assert any("fill rate" in r.message for r in caplog.records)


def test_concat_dataset_mixes_formats(tmp_path, tiny_model_dir, alpaca_file, oasst1_dir, cache_dir):
    from transformers import AutoTokenizer

    tok = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=tiny_model_dir)
    mixed = ConcatDataset(datasets=[
        dict(type=process_hf_dataset, **alpaca_cfg(alpaca_file, tiny_model_dir, pack_to_max_length=False)),
        dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path=oasst1_dir), tokenizer=tok,
             max_length=64, dataset_map_fn=oasst1_map_fn,
             template_map_fn=dict(type=template_map_fn_factory, template=QWEN)),
    ])
    first, second = mixed.datasets
    assert len(mixed) == len(first) + len(second)
    batch = default_collate_fn([mixed[0], mixed[len(first)]])
    assert batch["input_ids"].shape[0] == 2
    assert "num_tokens" in mixed[0] and "input_ids" in mixed.column_names


def test_pretokenized_rows_from_disk(tmp_path, tiny_model_dir, alpaca_file, cache_dir):
    from datasets import load_from_disk

    plain = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, pack_to_max_length=False))
    plain.save_to_disk(str(tmp_path / "tokenized"))
    again = process_hf_dataset(dataset=dict(type=load_from_disk, dataset_path=str(tmp_path / "tokenized")),
                               do_dataset_tokenization=False, max_length=64, pack_to_max_length=False)
    assert rows_of(again) == rows_of(plain)
    packed = process_hf_dataset(dataset=dict(type=load_from_disk, dataset_path=str(tmp_path / "tokenized")),
                                do_dataset_tokenization=False, max_length=64)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(r["input_ids"]) for r in plain)


def test_parallel_tokenization_gives_the_same_rows(tmp_path, tiny_model_dir, alpaca_file, cache_dir):
    one = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, use_cache=False, pack_to_max_length=False))
    two = process_hf_dataset(**alpaca_cfg(alpaca_file, tiny_model_dir, use_cache=False, pack_to_max_length=False,
                                          map_num_proc=2))
    assert rows_of(one) == rows_of(two)


def _prepare_on_rank(rank: int, port: int, cfg_args: tuple, cache: str, out_dir: str) -> None:
    import json as _json
    import logging as _logging

    import torch.distributed as dist

    os.environ["LMTUNE_CACHE"] = cache
    records: list[str] = []

    class Keep(_logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    _logging.getLogger("lmtune").addHandler(Keep())
    _logging.getLogger("lmtune").setLevel(_logging.INFO)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            time.sleep(1.0)  # rank 0 is busy preparing; rank 1 must wait for its copy, not prepare one
        ds = process_hf_dataset(**alpaca_cfg(*cfg_args))
        rows = [list(r["input_ids"]) for r in ds]
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            _json.dump({"rows": rows, "log": records}, fh)
    finally:
        dist.destroy_process_group()


def test_with_two_ranks_rank0_prepares_and_rank1_reads_the_cache(tmp_path, tiny_model_dir, alpaca_file):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_prepare_on_rank, args=(port, (alpaca_file, tiny_model_dir), str(tmp_path / "cache"), str(tmp_path)),
             nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["rows"] == rank1["rows"] and rank0["rows"]
    assert not any("from cache" in m for m in rank0["log"])
    assert any("Loaded the processed dataset from cache" in m for m in rank1["log"])


def test_batch_prefetch_gives_the_same_ids_as_text_by_text(tiny_tokenizer):
    from conftest import OASST1_ROWS

    from lmtune.dataset.encode import ConversationEncoder

    template = template_map_fn_factory(QWEN)
    rows = [template(oasst1_map_fn({"text": t})) for t in OASST1_ROWS]
    rows = [r for r in rows if r["conversation"]]
    batched = ConversationEncoder(tiny_tokenizer, None)
    batched.prefetch(rows)
    assert batched._cache  # the batch was tokenized up front
    single = ConversationEncoder(tiny_tokenizer, None)
    assert [batched(r) for r in rows] == [single(r) for r in rows]
