"""lmtune check-dataset, log-dataset and list-dataset-format."""

from __future__ import annotations

from pathlib import Path

from conftest import write_jsonl

import lmtune
from lmtune.cli import main

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def opts(model_dir, data_dir, *extra):
    return ["--cfg-options", f"pretrained_model_name_or_path={model_dir}", f"data_path={data_dir}",
            "max_length=64", *extra]


def test_list_dataset_format(capsys):
    assert main(["list-dataset-format"]) == 0
    out = capsys.readouterr().out
    for name in ("alpaca", "oasst1", "openai", "sharegpt", "wizardlm", "pretrain", "msagent_react"):
        assert f"\n{name} " in "\n" + out


def test_check_dataset_shows_each_stage(capsys, tiny_model_dir, oasst1_dir):
    assert main(["check-dataset", str(SEED_CFG), *opts(tiny_model_dir, oasst1_dir)]) == 0
    out = capsys.readouterr().out
    assert "formats that fit the first rows: " in out and "oasst1" in out.split("formats that fit")[1].split("\n")[0]
    assert "dataset_map_fn: oasst1_map_fn" in out
    for stage in ("[raw]", "[conversation]", "[text, trained part", "[input_ids]", "[labels]", "[packed row 0]"):
        assert stage in out
    assert ">>>The capital of France is Paris.<|im_end|><<<" in out
    assert "OK: " in out


def test_check_dataset_reports_malformed_rows_by_number(capsys, tmp_path, tiny_model_dir):
    rows = [{"text": "### Human: Hi### Assistant: Hello"}, {"txt": "wrong field"},
            {"text": "### Human: Bye### Assistant: Bye"}, {"body": "also wrong"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    assert main(["check-dataset", str(SEED_CFG), *opts(tiny_model_dir, tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "[problem] row 1 of" in out and "[problem] row 3 of" in out and "'text'" in out
    assert "2 malformed rows" in out


def test_check_dataset_suggests_a_format_when_none_is_set(capsys, tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 3)
    main(["check-dataset", str(SEED_CFG), *opts(tiny_model_dir, tmp_path / "d", "train_dataset.dataset_map_fn=None")])
    out = capsys.readouterr().out
    assert "formats that fit the first rows: alpaca" in out
    assert "one is needed" in out


def test_log_dataset_shows_the_processed_rows(capsys, tiny_model_dir, oasst1_dir):
    assert main(["log-dataset", str(SEED_CFG), *opts(tiny_model_dir, oasst1_dir), "--show", "masked_text"]) == 0
    out = capsys.readouterr().out
    assert "[masked_text]" in out and "[masked:" in out and "[input_ids]" not in out
    assert main(["log-dataset", str(SEED_CFG), *opts(tiny_model_dir, oasst1_dir), "--show", "all"]) == 0
    out = capsys.readouterr().out
    for part in ("[text]", "[masked_text]", "[input_ids]", "[labels]"):
        assert part in out


def test_check_dataset_shows_the_training_rows_truncated_as_training_truncates(capsys, tiny_model_dir, oasst1_dir):
    """check-dataset and training go through the same stages (lmtune.dataset.stages): the ids it shows for
    a row cut to max_length are the ids of that row in the (unpacked) training data."""
    from datasets import load_dataset

    from lmtune.config import Config
    from lmtune.dataset.huggingface import process_hf_dataset
    from lmtune.dataset.stages import row_processor

    settings = {"pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir, "max_length": 512,
                "pack_to_max_length": False, "train_dataset.shuffle_before_pack": False}
    ds = {k: v for k, v in dict(Config.fromfile(SEED_CFG, settings).train_dataset).items() if k != "type"}
    raw = load_dataset(oasst1_dir, split="train")
    whole = row_processor(ds["tokenizer"], None, ds["dataset_map_fn"], ds["template_map_fn"]).stage(raw[0])
    first_trained = next(i for i, label in enumerate(whole.encoded["labels"]) if label != -100)
    cut = first_trained + 3  # row 0 loses its end but keeps trained tokens
    assert cut < whole.encoded["length"]
    settings["max_length"] = cut
    assert main(["check-dataset", str(SEED_CFG), "--cfg-options", *[f"{k}={v}" for k, v in settings.items()]]) == 0
    out = capsys.readouterr().out
    assert f"[truncated to max_length={cut}]" in out
    shown = out.split("[input_ids] ")[1].split("\n")[0]
    ds = {k: v for k, v in dict(Config.fromfile(SEED_CFG, settings).train_dataset).items() if k != "type"}
    training = process_hf_dataset(**{**ds, "use_cache": False})
    assert shown == str(training[0]["input_ids"]) and len(training[0]["input_ids"]) == cut
    staged = row_processor(ds["tokenizer"], cut, ds["dataset_map_fn"], ds["template_map_fn"]).stage(raw[0])
    assert staged.truncated and staged.encoded["input_ids"] == training[0]["input_ids"]
    assert staged.encoded["labels"] == training[0]["labels"]
