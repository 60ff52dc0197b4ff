"""Runner behaviour a user relies on: resume through the CLI, early and precise config errors, the dump."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lmtune
from lmtune.cli import main
from lmtune.config import Config, ConfigError
from lmtune.engine.runner import Runner

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def argv(model_dir, data_dir, work_dir, *extra):
    return ["train", str(SEED_CFG), "--work-dir", str(work_dir), "--cfg-options",
            f"pretrained_model_name_or_path={model_dir}", f"data_path={data_dir}", "max_length=64",
            "max_epochs=2", "accumulative_counts=1", "save_steps=3", "evaluation_freq=4", "lr=1e-3",
            "evaluation_inputs=['Hi']", "custom_hooks.1.max_new_tokens=3", "model.llm.quantization_config=None",
            "default_hooks.logger.interval=1", "default_hooks.checkpoint.max_keep_ckpts=-1", *extra]


def scalars(work_dir: Path) -> list[dict]:
    (log,) = sorted(work_dir.glob("*/scalars.jsonl"))[-1:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_cli_resume_without_a_fixed_seed_reproduces_the_run(tmp_path, tiny_model_dir, oasst1_dir):
    whole = tmp_path / "whole"
    assert main(argv(tiny_model_dir, oasst1_dir, whole)) == 0  # the spec's randomness: seed=None
    trace = scalars(whole)
    seed = json.loads((whole / "iter_3" / "meta.json").read_text())["seed"]

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(whole / "iter_3", part / "iter_3")
    (part / "last_checkpoint").write_text("iter_3\n")
    assert main(["train", str(SEED_CFG), "--resume", "--work-dir", str(part)]
                + argv(tiny_model_dir, oasst1_dir, part)[4:]) == 0
    tail = scalars(part)
    assert [s["iter"] for s in tail] == [s["iter"] for s in trace[3:]]
    for a, b in zip(trace[3:], tail):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
    dumped = Config.fromfile(part / f"{SEED_CFG.stem}.py")
    assert dumped.randomness["seed"] == seed  # the effective config names the seed actually used
    chats = [json.loads(line)["when"] for line in next(whole.glob("*/eval_chat.jsonl")).read_text().splitlines()]
    assert "iter 4" in chats  # evaluate-chat runs every evaluation_freq iterations too


@pytest.mark.parametrize("option, message", [
    ("default_hooks.checkpoint.intervall=5", "did you mean 'interval'"),
    ("default_hooks.logger.intervl=3", "did you mean 'interval'"),
    ("max_norm='abc'", "max_norm must be a positive number"),
    ("accumulative_counts=0", "accumulative_counts must be a positive integer"),
    ("max_length=-1", r"max_length setting\) must be an integer of at least 2"),
    ("lr=True", r"lr must be a non-negative number \(the lr setting\), got True"),
    ("lr='fast'", r"lr must be a non-negative number"),
    ("warmup_ratio=2", r"param_scheduler.1 \(CosineAnnealingLR\) begins at 4 but ends at 2"),
    ("save_steps=-5", r"interval \(save_steps\) must be a positive integer, or -1"),
    ("default_hooks.checkpoint.max_keep_ckpts=-3", r"max_keep_ckpts \(save_total_limit\) must be"),
    ("SYSTEM=42", r"the SYSTEM setting\) must be a string, got 42"),
    ("evaluation_inputs={'a':1}", r"the evaluation_inputs setting\): item 1 must be a string or a dict"),
    ("evaluation_inputs=3", r"the evaluation_inputs setting\) must be a list of prompts"),
    ("evaluation_freq='abc'", "EvaluateChatHook|every_n_iters"),
    ("train_cfg.max_epochs=-1", "max_epochs must be a positive integer"),
    ("pretrained_model_name_or_path=/no/such/model", "the path '/no/such/model' does not exist"),
])
def test_bad_settings_fail_before_training_with_the_key(tmp_path, tiny_model_dir, oasst1_dir, capsys, option,
                                                        message):
    code = main(argv(tiny_model_dir, oasst1_dir, tmp_path / "w") + [option])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not list((tmp_path / "w").glob("iter_*"))


def test_a_misspelt_top_level_key_is_an_error(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("model = dict()\nparam_schedulr = []\ntrain_dataloader = dict()\n")
    with pytest.raises(ConfigError, match="did you mean 'param_scheduler'"):
        Runner.from_config(Config.fromfile(cfg_file), work_dir=str(tmp_path / "w"))


def test_an_override_of_a_shared_dict_reaches_every_use():
    cfg = Config.fromfile(SEED_CFG, {"tokenizer.padding_side": "left"})
    assert cfg.tokenizer.padding_side == "left"
    assert cfg.train_dataset.tokenizer.padding_side == "left"
    assert cfg.train_dataloader.dataset.tokenizer.padding_side == "left"
    assert all(h["tokenizer"].padding_side == "left" for h in cfg.custom_hooks)


def test_work_dir_holding_the_config_does_not_overwrite_it(tmp_path, tiny_model_dir, oasst1_dir):
    cfg_file = tmp_path / "my.py"
    shutil.copy(SEED_CFG, cfg_file)
    before = cfg_file.read_text()
    args = argv(tiny_model_dir, oasst1_dir, tmp_path)
    args[1] = str(cfg_file)
    main(args + ["data_path=/nonexistent/data"])
    assert cfg_file.read_text() == before
