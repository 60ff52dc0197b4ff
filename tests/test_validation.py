"""Validation while training: the held-out loss is exact however the split is batched or packed, a split never
overlaps the training rows, validation leaves training unchanged, the best checkpoint and early stopping decide
alike through a resume, answer metrics on hand-written answers, XTuner's MMLU evaluation config runs, and bad
validation settings stop before training."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.dataset import process_hf_dataset
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.evaluation import answer_scores, mean_scores, normalize, rouge_l
from lmtune.engine.runner import Runner

SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"


def unique_rows(n: int, start: int = 0) -> list[dict]:
    """oasst1-format rows that differ from each other (and in length)."""
    return [{"text": f"### Human: What is {i} plus {i}?### Assistant: {i} plus {i} is {2 * i}" + "!" * (i % 5)}
            for i in range(start, start + n)]


@pytest.fixture
def data(tmp_path) -> dict:
    write_jsonl(tmp_path / "train" / "train.jsonl", unique_rows(24))
    write_jsonl(tmp_path / "val" / "train.jsonl", unique_rows(7, start=100))
    return {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}


def config(model_dir: str, data_dir: str, **settings) -> Config:
    """The seed config, full fine-tuning in fp32 on the tiny model, with ``settings`` as --cfg-options."""
    opts = {"pretrained_model_name_or_path": model_dir, "data_path": data_dir, "max_length": 64, "max_epochs": 1,
            "accumulative_counts": 1, "save_steps": 1000, "lr": 1e-3, "batch_size": 2,
            "model.llm.quantization_config": None, "model.lora": None, "model.llm.torch_dtype": torch.float32,
            "optim_wrapper.dtype": "float32", "model.use_activation_checkpointing": False, "custom_hooks": [],
            "default_hooks.logger.interval": 1}
    opts.update(settings)
    return Config.fromfile(SEED_CFG, opts)


def val_loader(cfg: Config, data_dir: str, pack: bool, batch_size: int) -> dict:
    dataset = {**cfg.train_dataloader.dataset, "dataset": {**cfg.train_dataloader.dataset.dataset, "path": data_dir},
               "pack_to_max_length": pack}
    # drop_last as a training loader may have it: validation still reads every row
    return dict(batch_size=batch_size, dataset=dataset, collate_fn=dict(type=default_collate_fn), drop_last=True)


def scalars(runner: Runner) -> list[dict]:
    return [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]


def val_rows(rows: list[dict]) -> dict[int, dict]:
    return {row["iter"]: row for row in rows if "val/loss" in row}


# ------------------------------------------------------------------ the loss is exact

def test_validation_loss_is_the_same_packed_or_not_at_any_batch_size(tmp_path, tiny_model_dir, data):
    values = {}
    for pack in (False, True):
        for batch_size in (1, 3, 8):
            cfg = config(tiny_model_dir, data["train"])
            cfg["val_dataloader"] = val_loader(cfg, data["val"], pack, batch_size)
            runner = Runner.from_config(cfg, work_dir=str(tmp_path / f"w{pack}{batch_size}"), seed=0)
            values[pack, batch_size] = runner.val_loop.run()
    # the definition: every target token of the split, each sample alone, summed, over their count
    model = runner.unwrapped_model.eval()
    total, tokens = 0.0, 0
    unpacked = process_hf_dataset(**{k: v for k, v in val_loader(cfg, data["val"], False, 1)["dataset"].items()
                                     if k != "type"})
    assert len(unpacked) == 7
    with torch.no_grad():
        for row in unpacked:
            out = model(**default_collate_fn([row]))
            total, tokens = total + float(out["loss_sum"]), tokens + int(out["num_tokens"])
    expected = total / tokens
    for key, metrics in values.items():
        assert metrics["val/tokens"] == tokens, key
        assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6, abs=0), key
        assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-6), key


def test_a_split_never_overlaps_the_training_rows_and_is_cached_with_them(tmp_path, tiny_model_dir, data, caplog):
    def texts(dataset) -> list[str]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        return [tok.decode(row["input_ids"]) for row in dataset]

    cfg = config(tiny_model_dir, data["train"], pack_to_max_length=False, val_split=0.25)
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "a"), seed=0)
    train, val = texts(runner.train_dataloader.dataset), texts(runner.val_dataloader.dataset)
    assert len(val) == 6 and len(train) == 18
    assert not set(train) & set(val)
    whole = texts(process_hf_dataset(**{k: v for k, v in config(tiny_model_dir, data["train"],
                                                                 pack_to_max_length=False).train_dataloader.dataset.items()
                                        if k != "type"}))
    assert sorted(train + val) == sorted(whole)
    # the same split whatever the run's seed, from the cache the second time
    caplog.clear()
    again = Runner.from_config(config(tiny_model_dir, data["train"], pack_to_max_length=False, val_split=0.25),
                               work_dir=str(tmp_path / "b"), seed=5)
    assert texts(again.val_dataloader.dataset) == val
    assert caplog.text.count("Loaded the processed dataset from cache") >= 2
    # another split seed draws other rows; a count works as well as a fraction
    other = Runner.from_config(config(tiny_model_dir, data["train"], pack_to_max_length=False,
                                      val_split=dict(size=6, seed=1)), work_dir=str(tmp_path / "c"), seed=0)
    assert sorted(texts(other.val_dataloader.dataset)) != sorted(val)
    assert len(other.val_dataloader.dataset) == 6


# ------------------------------------------------------------------ validation leaves training alone

def test_validation_and_answer_metrics_leave_training_unchanged(tmp_path, tiny_model_dir, data):
    from lmtune.engine.hooks import EvaluateChatHook

    chat = dict(type=EvaluateChatHook, tokenizer=None, every_n_iters=4, max_new_tokens=4, prompt_template=None,
                evaluation_inputs=[dict(input="What is 1 plus 1?", answer="1 plus 1 is 2"), "Say hi."])
    plain = Runner.from_config(config(tiny_model_dir, data["train"]), work_dir=str(tmp_path / "plain"), seed=0)
    plain.train()
    cfg = config(tiny_model_dir, data["train"], val_dataset=None, val_interval=3, val_before_train=True)
    cfg["val_dataset"] = val_loader(cfg, data["val"], True, 1)["dataset"]
    chat["tokenizer"] = cfg.tokenizer
    cfg["custom_hooks"] = [chat]
    validated = Runner.from_config(cfg, work_dir=str(tmp_path / "val"), seed=0)
    validated.train()
    for (name, a), (_, b) in zip(plain.unwrapped_model.named_parameters(),
                                 validated.unwrapped_model.named_parameters()):
        assert torch.equal(a, b), name
    train_a = [(r["iter"], r["loss"]) for r in scalars(plain) if "loss" in r]
    train_b = [(r["iter"], r["loss"]) for r in scalars(validated) if "loss" in r]
    assert train_a == train_b
    last = validated.max_iters
    assert sorted(val_rows(scalars(validated))) == sorted({0, *range(3, last + 1, 3), last})
    # the answer metrics of every evaluation are logged beside the validation scalars, and each answer's scores
    chat_rows = [r for r in scalars(validated) if "chat/rouge_l" in r]
    assert [r["iter"] for r in chat_rows] == [0, *range(4, last, 4), last]
    answers = [json.loads(line) for line in (validated.log_dir / "eval_chat.jsonl").read_text().splitlines()]
    scored = [a for a in answers if "reference" in a]
    assert len(scored) == len(chat_rows) and all(a["input"] == "What is 1 plus 1?" for a in scored)
    assert chat_rows[-1]["chat/rouge_l"] == pytest.approx(scored[-1]["rouge_l"])


# ------------------------------------------------------------------ best checkpoint and early stopping

def _stopping_config(model_dir: str, data: dict, **settings) -> Config:
    # 'greater' on a falling loss: the first evaluation stays the best, so the run stops after `patience` more
    from lmtune.engine.hooks import EvaluateChatHook

    cfg = config(model_dir, data["train"], val_interval=2, save_steps=2, lr=1e-2, batch_size=1,
                 save_best="val/loss", early_stopping=dict(monitor="val/loss", rule="greater", patience=2,
                                                           min_delta=0.0, strict=True), **settings)
    cfg["val_dataset"] = val_loader(cfg, data["val"], True, 1)["dataset"]
    cfg["default_hooks"]["checkpoint"]["rule"] = "greater"
    # answer metrics reported too (before training, every 3 iterations, on resuming): they must not disturb
    # the decisions on val/loss, strict as they are
    cfg["custom_hooks"] = [dict(type=EvaluateChatHook, tokenizer=cfg.tokenizer, every_n_iters=3, max_new_tokens=2,
                                prompt_template=None, evaluation_inputs=[dict(input="Hi", answer="Hello")])]
    return cfg


def test_best_checkpoint_and_early_stopping_survive_a_resume(tmp_path, tiny_model_dir, data):
    whole = Runner.from_config(_stopping_config(tiny_model_dir, data, save_total_limit=1),
                               work_dir=str(tmp_path / "whole"), seed=0)
    assert whole.max_iters == 12  # 24 rows packed two by two
    whole.train()
    evaluations = val_rows(scalars(whole))
    assert sorted(evaluations) == [2, 4, 6]  # best at 2, no gain at 4 and 6: patience 2 is spent
    assert evaluations[2]["val/loss"] > evaluations[4]["val/loss"] > evaluations[6]["val/loss"]
    assert whole.completed_iters == 6
    # retention keeps the newest checkpoint and, beside it, the best
    assert sorted(p.name for p in ckpt.list_checkpoints(whole.work_dir)) == ["iter_2", "iter_6"]
    assert (whole.work_dir / "best_checkpoint").read_text().strip() == "iter_2"

    # a run killed after its checkpoint at iteration 4 and resumed decides alike
    cut = Runner.from_config(_stopping_config(tiny_model_dir, data), work_dir=str(tmp_path / "cut"), seed=0)
    cut.train()
    for later in ("iter_6",):
        shutil.rmtree(cut.work_dir / later)
    resumed = Runner.from_config(_stopping_config(tiny_model_dir, data), work_dir=str(tmp_path / "cut"), resume=True)
    assert resumed.iter == 4
    resumed.train()
    assert resumed.completed_iters == 6
    assert (resumed.work_dir / "best_checkpoint").read_text().strip() == "iter_2"
    assert val_rows(scalars(resumed))[6]["val/loss"] == pytest.approx(evaluations[6]["val/loss"], rel=1e-6)
    for (name, a), (_, b) in zip(whole.unwrapped_model.named_parameters(), resumed.unwrapped_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # resuming the stopped run trains nothing more
    after = Runner.from_config(_stopping_config(tiny_model_dir, data), work_dir=str(tmp_path / "cut"), resume=True)
    after.train()
    assert after.completed_iters == 6


# ------------------------------------------------------------------ answer metrics

def test_answer_metrics_on_hand_written_answers():
    assert normalize("  The  Capital, is PARIS! ") == "the capital is paris"
    assert answer_scores("Paris.", "paris") == {"exact_match": 1.0, "contains": 1.0, "rouge_l": 1.0}
    scores = answer_scores("The capital of France is Paris.", "Paris")
    assert scores["exact_match"] == 0.0 and scores["contains"] == 1.0
    assert scores["rouge_l"] == pytest.approx(2 * (1 / 6) * 1 / (1 / 6 + 1))
    assert answer_scores("Parisian food", "Paris")["contains"] == 0.0  # whole words only
    # LCS "a c d" of 4 and 4 words
    assert rouge_l("a b c d", "a c e d") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    # Chinese: characters are the words
    assert answer_scores("上海有外滩。", "外滩")["contains"] == 1.0
    assert rouge_l("上海外滩", "外滩") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert mean_scores([answer_scores("a", "a"), answer_scores("b", "a")])["exact_match"] == 0.5


def test_chat_references_from_a_jsonl_file_and_bad_ones(tmp_path):
    from lmtune.engine.hooks import EvaluateChatHook

    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1?", "reference": "2"}, {"input": "Hi"}])
    hook = EvaluateChatHook(tokenizer=None, evaluation_inputs=str(path))
    assert hook.inputs == ["1+1?", "Hi"] and hook.references == ["2", None]
    assert hook.metric_names() == ["chat/exact_match", "chat/contains", "chat/rouge_l"]
    (tmp_path / "bad.jsonl").write_text('{"input": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        EvaluateChatHook(tokenizer=None, evaluation_inputs=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="item 1"):
        EvaluateChatHook(tokenizer=None, evaluation_inputs=[{"answer": "no prompt"}])


# ------------------------------------------------------------------ XTuner's MMLU evaluation

# XTuner's internlm_7b_qlora_oasst1_mmlu_e3.py, its evaluation part, over the seed config
MMLU_CONFIG = """
    from xtuner.dataset.collate_fns import mmlu_collate_fn
    from xtuner.dataset.map_fns import default_map_fn
    from xtuner.evaluation import MMLUMetric

    mmlu_fs_dataset = dict(type=load_dataset, path="json",
                           data_files=dict(val="{root}/mmlu_val.json", test="{root}/mmlu_val.json"))
    val_mmlu_fs = dict(type=process_hf_dataset, dataset=mmlu_fs_dataset, tokenizer=tokenizer,
                       dataset_map_fn=default_map_fn, max_length=max_length, input_ids_with_output=False,
                       pack_to_max_length=False, split="val")
    val_dataloader = dict(batch_size=2, num_workers=0, dataset=val_mmlu_fs,
                          sampler=dict(type=DefaultSampler, shuffle=False), collate_fn=dict(type=mmlu_collate_fn))
    val_evaluator = dict(type=MMLUMetric, tokenizer=tokenizer, prefix="mmlu_fs_val")
    test_dataloader = val_dataloader
    test_evaluator = val_evaluator
    val_cfg = dict(type="ValLoop")
    test_cfg = dict(type="TestLoop")
    train_cfg = dict(type=TrainLoop, max_epochs=max_epochs, val_interval=2)
"""


def _mmlu_on_rank(rank: int, port: int, path: str, overrides: dict, out_dir: str) -> None:
    """One of two ranks validating the MMLU config with each row split over both (sequence_parallel_size=2)."""
    import os

    from lmtune.engine.strategies import launch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    launch.init_distributed("none")
    try:
        cfg = Config.fromfile(path, {**overrides, "sequence_parallel_size": 2})
        loop = Runner.from_config(cfg, work_dir=f"{out_dir}/sp", seed=0).val_loop
        metrics = loop.run()
        Path(f"{out_dir}/metrics{rank}.json").write_text(json.dumps([metrics, len(loop.evaluator.results)]))
    finally:
        launch.destroy_distributed(finished=True)


def test_xtuner_mmlu_evaluation_config_runs(tmp_path, tiny_model_dir, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"input": f"Question {i}: pick one.\nA. x\nB. y\nC. z\nD. w\nAnswer:", "output": "ABCD"[i % 4],
             "subject": ["anatomy", "astronomy", "virology"][i % 3]} for i in range(9)]
    (tmp_path / "mmlu_val.json").write_text(json.dumps(rows))
    path = tmp_path / "mmlu_cfg.py"
    path.write_text(SEED_CFG.read_text() + textwrap.dedent(MMLU_CONFIG).format(root=tmp_path))
    overrides = {"pretrained_model_name_or_path": tiny_model_dir, "data_path": data["train"],
                 "max_length": 64, "model.llm.quantization_config": None, "model.lora": None,
                 "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32",
                 "custom_hooks": [], "save_best": "mmlu_fs_val/average", "lr": 1e-3,
                 "batch_size": 4, "max_epochs": 1, "accumulative_counts": 1}
    runner = Runner.from_config(Config.fromfile(path, overrides), work_dir=str(tmp_path / "mmlu"), seed=0)
    first = runner.val_loop.run()
    # the accuracy by hand: the likeliest of the four letters after each prompt
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"]
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tok.encode(row["input"], add_special_tokens=False)])
            choice = int(model(input_ids=ids).logits[0, -1, letters].argmax())
            hits.setdefault(row["subject"], []).append("ABCD"[choice] == row["output"])
    by_subject = {s: 100 * sum(h) / len(h) for s, h in hits.items()}
    for subject, value in by_subject.items():
        assert first[f"mmlu_fs_val/{subject}"] == pytest.approx(value)
    assert first["mmlu_fs_val/average"] == pytest.approx(sum(by_subject.values()) / 3)
    assert "val/loss" not in first  # prompts only: nothing to take a loss of
    # under sequence parallelism both ranks of the group read the rows whole; the metrics are one process's
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_mmlu_on_rank, args=(port, str(path), overrides, str(tmp_path)), nprocs=2, join=True)
    for rank, kept in ((0, 9), (1, 0)):  # the group's first rank keeps the 9 rows' results, the other none
        metrics, results = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert metrics == pytest.approx(first) and results == kept
    # batches of several rows need each row's length: the training collate function gives none
    cfg_default = Config.fromfile(path, {"pretrained_model_name_or_path": tiny_model_dir, "data_path": data["train"],
                                         "custom_hooks": [], "model.llm.quantization_config": None})
    cfg_default["val_dataloader"]["collate_fn"] = dict(type=default_collate_fn)
    with pytest.raises(ConfigError, match="need an attention_mask: use collate_fn=dict\\(type=mmlu_collate_fn\\)"):
        Runner.from_config(cfg_default, work_dir=str(tmp_path / "default"), seed=0).val_loop.run()
    runner.train()
    logged = [r for r in scalars(runner) if "mmlu_fs_val/average" in r]
    assert [r["iter"] for r in logged] == list(range(2, runner.max_iters + 1, 2)) + (
        [runner.max_iters] if runner.max_iters % 2 else [])


# ------------------------------------------------------------------ bad settings

@pytest.mark.parametrize(("settings", "message"), [
    (dict(val_split=0.01), r"val_split=0.01 selects 0 of the 24 rows"),
    (dict(val_split=1.5), r"val_split must be a fraction"),
    (dict(val_split=24), r"leaving none to train on"),
    (dict(val_split=4, val_interval=0), r"val_interval must be a positive integer"),
    (dict(val_split=4, save_best="val/acc"), r"save_best='val/acc' is never logged by this run; it logs"),
    (dict(save_best="val/loss"), r"this run evaluates nothing"),
    (dict(val_split=4, save_best="val/loss", early_stopping=dict(monitor="chat/rouge_l")),
     r"early_stopping monitor='chat/rouge_l' is never logged"),
    (dict(val_split=4, early_stopping=dict(patience=2)), r"early_stopping must be dict\(monitor="),
    (dict(val_split=4, val_dataset=dict(type=process_hf_dataset)), r"sets val_dataset and val_split"),
])
def test_bad_validation_settings_stop_before_training(tmp_path, tiny_model_dir, data, settings, message):
    work = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        Runner.from_config(config(tiny_model_dir, data["train"], **settings), work_dir=str(work), seed=0)
    assert not work.exists()  # nothing written


def test_command_line_values_may_write_dicts_as_configs_do():
    from lmtune.config.config import parse_overrides

    got = parse_overrides(["early_stopping=dict(monitor='val/loss', patience=2, min_delta=0.0)",
                           "val_split=dict(size=0.02, seed=3)", "evaluation_inputs=[dict(input='Hi', answer='Hello')]"])
    assert got == {"early_stopping": {"monitor": "val/loss", "patience": 2, "min_delta": 0.0},
                   "val_split": {"size": 0.02, "seed": 3}, "evaluation_inputs": [{"input": "Hi", "answer": "Hello"}]}
    with pytest.raises(ConfigError, match="is not a Python value"):
        parse_overrides(["early_stopping=dict(monitor=val_loss)"])  # a name, not a value
