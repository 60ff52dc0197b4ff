"""Bad input names its culprit: the file, line, row, key or path, and what to do (issue 15, item 8)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.cli import main
from lmtune.engine import checkpoint as ckpt

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def _check_dataset(model_dir, data_dir, *extra) -> list[str]:
    return ["check-dataset", str(SEED_CFG), "--cfg-options", f"pretrained_model_name_or_path={model_dir}",
            f"data_path={data_dir}", "max_length=64", *extra]


@pytest.mark.parametrize("content, message", [
    (b"", r"train.jsonl: the file is empty \(no rows\)"),
    (b'{"text": "a"}\n{"text": \n', r"train.jsonl: line 2 is not valid JSON \(Expecting value"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8,
     r"train.jsonl: line 1 is not UTF-8 text \(is it a binary file\?\)"),
    (b'{"text": "a"}\n[1, 2]\n', r"train.jsonl: line 2 is a JSON list, where each line must be an object"),
])
def test_a_data_file_that_cannot_be_read_is_named_with_its_line(tmp_path, tiny_model_dir, capsys, content,
                                                                 message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(content)
    assert main(_check_dataset(tiny_model_dir, data)) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("lmtune: ")]
    assert line.startswith("lmtune: error: load_dataset(") and str(data / "train.jsonl") in line, err
    assert re.search(message, line), line


def test_a_full_datasets_cache_names_the_cache(tmp_path, tiny_model_dir, oasst1_dir, capsys, monkeypatch):
    from datasets.builder import DatasetBuilder

    def full(*args, **kwargs):  # as datasets reports it: the ENOSPC of writing the cache, wrapped
        from datasets.exceptions import DatasetGenerationError

        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise DatasetGenerationError("An error occurred while generating the dataset") from exc

    monkeypatch.setattr(DatasetBuilder, "download_and_prepare", full)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    assert main(_check_dataset(tiny_model_dir, oasst1_dir)) == 2
    err = capsys.readouterr().err
    assert f"no space left on the device of the datasets cache ({tmp_path / 'hf_cache'})" in err, err
    assert "HF_DATASETS_CACHE" in err


def test_an_override_that_opens_a_literal_must_close_it(capsys):
    assert main(["check", "demo", "--cfg-options", "optim_wrapper.optimizer.betas=[0.9,"]) == 2
    err = capsys.readouterr().err
    assert "--cfg-options optim_wrapper.optimizer.betas: '[0.9,' is not a Python value" in err, err


def test_a_config_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys):
    config = tmp_path / "latin1.py"
    config.write_bytes(b"max_length = 64\n# caf\xe9\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}, line 2: the file is not UTF-8 text (byte 0xe9)" in err, err


def test_chat_with_a_missing_local_path_names_it(tmp_path, capsys):
    missing = tmp_path / "merged"
    assert main(["chat", str(missing), "--prompt", "Hi"]) == 2
    assert f"lmtune chat: the path '{missing}' does not exist" in capsys.readouterr().err
    assert main(["chat", str(missing) + "/../x/y", "--adapter", str(missing), "--prompt", "Hi"]) == 2


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),  # torch.save, disk full
    OSError(errno.ENOSPC, "No space left on device"),  # raised without a file name
])
def test_a_full_disk_while_saving_names_the_file(tmp_path, monkeypatch, failure):
    import shutil
    from collections import namedtuple

    def failing_save(obj, f, *args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 10))
    with pytest.raises(OSError) as caught:
        ckpt.save_checkpoint(tmp_path, "iter_1", {"w": torch.zeros(2)}, {"state": {}}, {"loop": {}}, {"iter": 1})
    assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    assert caught.value.filename.endswith(ckpt.OPTIMIZER) and str(tmp_path) in caught.value.filename
    assert not ckpt.list_checkpoints(tmp_path) and not list(tmp_path.glob(".*"))  # nothing half-written
