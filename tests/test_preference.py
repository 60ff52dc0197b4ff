"""Preference training (DPO and its loss variants, ORPO, SimPO) and reward models.

The exactness tests compare with TRL's trainers on the same tokens: tests/fixtures/preference/ holds a tiny
Llama policy, a reference, and TRL's losses and metrics (written by benchmarks/trl_preference_fixture.py in
the TRL environment; TRL is not installed here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmtune.config import ConfigError
from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset.preference import build_preference_dataset, pack_pairs, preference_collate_fn

FIXTURE = Path(__file__).parent / "fixtures" / "preference"
TRL = json.loads((FIXTURE / "trl_reference.json").read_text())
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def llm(name: str = "policy") -> dict:
    from transformers import AutoModelForCausalLM

    return dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(FIXTURE / name),
                dtype=torch.float32)


def rows_of(pairs: list[dict]) -> list[dict]:
    """Rows as build_preference_dataset makes them, from prompt / response token ids."""
    rows = []
    for p in pairs:
        prompt = list(p["prompt_ids"])
        seqs = [(prompt + list(p[k]), [IGNORE_INDEX] * len(prompt) + list(p[k])) for k in ("chosen_ids",
                                                                                         "rejected_ids")]
        rows.append({"input_ids": seqs[0][0] + seqs[1][0], "labels": seqs[0][1] + seqs[1][1],
                     "num_tokens": [len(seqs[0][0]), len(seqs[1][0])], "length": len(seqs[0][0]) + len(seqs[1][0])})
    return rows


def packed(rows: list[dict], capacity: int) -> list[dict]:
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    out = pack_pairs(batch, capacity)
    return [{k: out[k][i] for k in out} for i in range(len(out["input_ids"]))]


def metrics_of(out: dict, pairs: int) -> dict:
    return {k: float(v) / pairs for k, v in out["metrics"].items()}


@pytest.fixture(scope="module")
def dpo_model():
    from lmtune.model import DPO

    return DPO(llm=llm(), ref_llm=llm("ref"), use_activation_checkpointing=False)


@pytest.mark.parametrize("layout", ["one pair a row", "packed"])
def test_dpo_loss_types_and_metrics_equal_trls(dpo_model, layout):
    fixture = TRL["dpo"]
    rows = rows_of(fixture["pairs"])
    batch = (preference_collate_fn(rows) if layout == "one pair a row"
             else preference_collate_fn(packed(rows, 300), use_varlen_attn=True))
    if layout == "packed":
        assert batch["input_ids"].shape[0] < len(rows)  # several pairs share a row
    for loss_type, expected in fixture["losses"].items():
        dpo_model.loss_type, dpo_model.label_smoothing = loss_type, expected["label_smoothing"]
        with torch.no_grad():
            out = dpo_model(**batch)
        assert float(out["loss"]) == pytest.approx(expected["loss"], abs=1e-5, rel=1e-5), loss_type
        got = metrics_of(out, len(rows))
        for name in METRICS:
            assert got[name] == pytest.approx(expected[name], abs=1e-5, rel=1e-5), (loss_type, name)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trls(kind):
    from lmtune.model import ORPO, SimPO

    fixture = TRL[kind]
    # TRL's ORPO takes the NLL over the chosen prompts too; XTuner's (lmtune's default) over the responses only
    model = (ORPO(llm=llm(), beta=fixture["beta"], nll_on_prompt=True, use_activation_checkpointing=False)
             if kind == "orpo" else
             SimPO(llm=llm(), beta=fixture["beta"], gamma=fixture["simpo_gamma"], cpo_alpha=fixture["cpo_alpha"],
                   use_activation_checkpointing=False))
    rows = rows_of(fixture["pairs"])
    for batch in (preference_collate_fn(rows), preference_collate_fn(packed(rows, 300), use_varlen_attn=True)):
        with torch.no_grad():
            out = model(**batch)
        assert float(out["loss"]) == pytest.approx(fixture["loss"], abs=1e-5, rel=1e-5)
        got = metrics_of(out, len(rows))
        for name in METRICS + (("log_odds_ratio", "log_odds_chosen") if kind == "orpo" else ()):
            assert got[name] == pytest.approx(fixture[name], abs=1e-5, rel=1e-5), name


def test_reward_model_equals_trls_reward_trainer():
    from lmtune.model import RewardModel

    fixture = TRL["reward"]
    model = RewardModel(llm=llm(), penalty_type="none", use_activation_checkpointing=False)
    with torch.no_grad():
        model.v_head.weight.copy_(torch.load(FIXTURE / "reward_head.pt")["score.weight"])
    token = fixture["reward_token_id"]
    rows = []
    for r in fixture["rows"]:
        seqs = [r["chosen_ids"], r["rejected_ids"]]
        labels = [[IGNORE_INDEX] * (len(s) - 1) + [token] for s in seqs]
        rows.append({"input_ids": seqs[0] + seqs[1], "labels": labels[0] + labels[1],
                     "num_tokens": [len(s) for s in seqs]})
    for batch in (preference_collate_fn(rows), preference_collate_fn(rows, use_varlen_attn=True)):
        with torch.no_grad():
            out = model(**batch)
        got = metrics_of(out, len(rows))
        assert float(out["loss"]) == pytest.approx(fixture["loss"], abs=1e-5)
        assert got["rewards/accuracies"] == pytest.approx(fixture["accuracy"])
        assert got["rewards/margins"] == pytest.approx(fixture["margin"], abs=1e-5)
        mean = (got["rewards/chosen"] + got["rewards/rejected"]) / 2
        assert mean == pytest.approx(fixture["mean_reward"], abs=1e-5)


# ------------------------------------------------------------------ the data


def write_pairs(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conv(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": rejected}  # a string: one assistant message


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE / "policy")


def test_pairs_are_the_chat_template_with_only_the_responses_trained(tmp_path, tokenizer):
    from datasets import load_dataset

    data = write_pairs(tmp_path / "pairs.jsonl", [conv("is the sky blue", "the sky is blue", "grass")])
    ds = build_preference_dataset(dict(type=load_dataset, path="json", data_files=data), tokenizer, 256,
                                  use_cache=False)
    row = ds[0]
    c, r = row["num_tokens"]
    messages = [{"role": "user", "content": "is the sky blue"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for start, n, answer in ((0, c, "the sky is blue"), (c, r, "grass")):
        ids, labels = row["input_ids"][start:start + n], row["labels"][start:start + n]
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert tokenizer.decode(ids) == full  # the whole conversation, as the template writes it
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert tokenizer.decode(labels[prompt_len:]) == full[len(prompt):]  # the response and its end marker


def test_bad_pairs_are_reported_by_row_or_dropped_and_counted(tmp_path, tokenizer, caplog):
    from datasets import load_dataset

    def build(rows, **kw):
        data = write_pairs(tmp_path / "bad.jsonl", rows)
        return build_preference_dataset(dict(type=load_dataset, path="json", data_files=data), tokenizer,
                                        kw.pop("max_length", 256), use_cache=False, **kw)

    good = conv("name a fruit", "an apple", "a dog")
    with pytest.raises(ConfigError, match=r"row 1 of .*bad.jsonl: it has no 'rejected'.*skip_bad_rows"):
        build([good, {"prompt": "hi", "chosen": "there"}])
    with pytest.raises(ConfigError, match=r"row 0 of .*its prompt is empty"):
        build([conv(" ", "a", "b"), good])
    caplog.set_level("INFO", logger="lmtune")
    ds = build([good, conv("say yes", "yes", "yes"), {"prompt": "x", "chosen": "y"},
                conv("count " * 100, "one two", "three")], max_length=64, skip_bad_rows=True)
    assert len(ds) == 1
    line = next(r.message for r in caplog.records if r.message.startswith("Preference dataset"))
    assert "1 malformed and skipped" in line and "1 dropped: chosen and rejected identical" in line
    assert "1 dropped: nothing to train after truncation" in line and "1 pairs" in line
    caplog.clear()
    ds = build([good, conv("name a colour " * 3, "red " * 20, "blue")], use_varlen_attn=True,
               max_packed_length=120)
    assert "1 dropped: longer than max_packed_length" in caplog.text and len(ds) == 1
    with pytest.raises(ConfigError, match="no pair .* is left"):
        build([conv("say yes", "yes", "yes")])
    with pytest.raises(ConfigError, match="reward_token_id must be set"):
        build([good], is_dpo=False, is_reward=True)


# ------------------------------------------------------------------ training runs

PREFERENCE_CONFIG = """\
import torch
from datasets import load_dataset
from torch.optim import SGD
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.dataset import DefaultSampler, build_preference_dataset, preference_collate_fn
from lmtune.dataset.preference import orpo_dpo_mix_40k_map_fn
from lmtune.engine.hooks import CheckpointHook, LoggerHook
from lmtune.engine.optim import AmpOptimWrapper
from lmtune.engine.runner import TrainLoop
from lmtune.model import DPO, ORPO, RewardModel, SimPO

path = {path!r}
data_files = {data!r}
use_varlen_attn = False
batch_size = 2
accumulative_counts = 1
max_iters = 1
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path)
model = dict(type={model}, use_varlen_attn=use_varlen_attn, use_activation_checkpointing=False,
             llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path,
                      dtype=torch.float32))
train_dataloader = dict(
    batch_size=batch_size, num_workers=0,
    dataset=dict(type=build_preference_dataset, dataset=dict(type=load_dataset, path="json", data_files=data_files),
                 tokenizer=tokenizer, max_length=96, dataset_map_fn=orpo_dpo_mix_40k_map_fn,
                 use_varlen_attn=use_varlen_attn, max_packed_length=400, shuffle_before_pack=False),
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=preference_collate_fn, use_varlen_attn=use_varlen_attn))
optim_wrapper = dict(type=AmpOptimWrapper, optimizer=dict(type=SGD, lr=1.0), accumulative_counts=accumulative_counts,
                     dtype="float32")
param_scheduler = []
train_cfg = dict(type=TrainLoop, max_iters=max_iters)
default_hooks = dict(logger=dict(type=LoggerHook, interval=1),
                     checkpoint=dict(type=CheckpointHook, interval=1000, by_epoch=False))
"""


def mix_rows(n: int = 8) -> list[dict]:
    """orpo-dpo-mix-40k rows (whole conversations) with responses of quite different lengths."""
    import random

    rng = random.Random(7)
    words = "the sky is blue grass green apples pears red yellow cat dog".split()
    rows = []
    for k in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 6)))}]
        rows.append({key: prompt + [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(
            1, 3 + 3 * (k % 4))))}] for key in ("chosen", "rejected")})
    return rows


def preference_run(tmp_path: Path, name: str, model: str = "DPO", **settings):
    from lmtune.config import Config
    from lmtune.engine.runner import Runner

    data = tmp_path / "mix.jsonl"
    if not data.exists():
        write_pairs(data, mix_rows())
    path = tmp_path / f"{name}.py"
    path.write_text(PREFERENCE_CONFIG.format(path=str(FIXTURE / "policy"), data=str(data), model=model))
    cfg = Config.fromfile(path, {k: v for k, v in settings.items()})
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / name), seed=3)
    runner.train()
    rows = [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    return runner, rows


def trained(runner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in runner.model.trainable_state_dict().items()}


@pytest.mark.parametrize("model", ["ORPO", "DPO"])
def test_accumulated_micro_batches_and_packing_give_the_step_of_one_batch(tmp_path, model):
    # ORPO divides its two terms by different totals (pairs, chosen tokens): both must be the step's
    one, rows_one = preference_run(tmp_path, "one", model, batch_size=4)
    acc, rows_acc = preference_run(tmp_path, "acc", model, batch_size=1, accumulative_counts=4, max_iters=4)
    a, b = trained(one), trained(acc)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # the logged metrics of the step are over all 4 pairs: the mean of the 4 micro-batches'
    means = {k: sum(r[k] for r in rows_acc) / 4 for k in ("rewards/margins", "logps/chosen")}
    assert means["logps/chosen"] == pytest.approx(rows_one[0]["logps/chosen"], abs=1e-4)
    assert means["rewards/margins"] == pytest.approx(rows_one[0]["rewards/margins"], abs=1e-5)
    if model == "DPO":  # all 8 pairs in one step: one pair a row, or packed into a single row
        rows_run, _ = preference_run(tmp_path, "rows", model, batch_size=8)
        packed_run, _ = preference_run(tmp_path, "packed", model, batch_size=1, use_varlen_attn=True,
                                       **{"train_dataloader.dataset.max_packed_length": 2000})
        assert len(packed_run.train_loop.dataloader.dataset) == 1
        a, b = trained(rows_run), trained(packed_run)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_pairs_are_tokenized_as_xtuner_tokenizes_them(tmp_path, tokenizer):
    """XTuner 0.2.0's own tokenize / tokenize_ref on the same rows (benchmarks/xtuner_preference_fixture.py)."""
    from datasets import Dataset

    xt = json.loads((FIXTURE / "xtuner_tokenized.json").read_text())
    cases = {"dpo": (xt["rows"], {}), "reward": (xt["rows"], {"is_dpo": False, "is_reward": True}),
             "polar": (xt["polar_rows"], {"is_dpo": False, "is_reward": True, "is_reference": True,
                                          "max_response_length": xt["max_response_length"]})}
    for kind, (rows, settings) in cases.items():
        if kind != "dpo":
            settings["reward_token_id"] = xt["reward_token_id"]
        ds = build_preference_dataset(Dataset.from_list([json.loads(json.dumps(r)) for r in rows]), tokenizer,
                                      xt["max_length"], use_cache=False, **settings)
        for row, expected in zip(ds, xt[kind]):
            c, r = row["num_tokens"]
            assert row["input_ids"][:c] == expected["chosen_ids"], kind
            assert row["input_ids"][c:] == expected["rejected_ids"], kind
            trained = [label != IGNORE_INDEX for label in row["labels"]]
            # XTuner marks the reward token with 0 / 1 and lmtune with its id: the same positions are trained
            want = [label != IGNORE_INDEX for label in expected["chosen_labels"] + expected["rejected_labels"]]
            want[0] = want[c] = False  # a sequence's first token is never predicted (XTuner's first is a prompt token)
            assert trained == want, kind


def test_a_reward_model_exports_as_sequence_classification_and_scores_from_the_cli(tmp_path, capsys):
    from lmtune.cli import main
    from lmtune.dataset.preference import reward_sequence
    from lmtune.tools.score import load_reward_model, score

    runner, rows = preference_run(tmp_path, "rm", "RewardModel", max_iters=2, **{
        "train_dataloader.dataset.is_dpo": False, "train_dataloader.dataset.is_reward": True,
        "train_dataloader.dataset.reward_token_id": 5, "model.penalty_type": "L2"})
    assert rows[-1]["rewards/accuracies"] >= 0 and "rewards/margins" in rows[-1]
    trained_model = runner.model
    assert float(trained_model.v_head.weight.detach().abs().sum()) > 0  # the head (zero at the start) trained
    out = tmp_path / "hf_rm"
    checkpoint = tmp_path / "rm" / "iter_2"  # its config.py is the run's effective config
    assert main(["convert", "pth_to_hf", str(checkpoint / "config.py"), str(checkpoint), str(out)]) == 0
    model, tokenizer, token = load_reward_model(str(out))
    assert type(model).__name__ == "LlamaForSequenceClassification" and token == 5
    conversation = [{"role": "user", "content": "is the sky blue"}, {"role": "assistant", "content": "it is"}]
    ids = torch.tensor([reward_sequence(tokenizer, conversation, token)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -1] = token
    with torch.no_grad():
        expected = float(trained_model.scores(ids, labels)[0])
    assert score(model, tokenizer, conversation, token) == pytest.approx(expected, abs=1e-5)
    data = write_pairs(tmp_path / "score.jsonl", [{"messages": conversation}, conv("is it", "yes", "no")])
    capsys.readouterr()
    assert main(["score", str(out), data]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["score"] == pytest.approx(expected, abs=1e-5) and lines[1]["preferred"] in ("chosen", "rejected")
    bad = write_pairs(tmp_path / "bad.jsonl", [{"text": "no messages"}])
    assert main(["score", str(out), bad]) == 2
    assert "bad.jsonl: line 1: fields ['text']" in capsys.readouterr().err


def test_check_and_check_dataset_know_preference_configs(tmp_path, capsys):
    from lmtune.cli import main

    data = write_pairs(tmp_path / "mix.jsonl", mix_rows(4) + [{"chosen": [{"role": "user", "content": "x"}]}])
    cfg = tmp_path / "dpo.py"
    cfg.write_text(PREFERENCE_CONFIG.format(path=str(FIXTURE / "policy"), data=data, model="DPO"))
    capsys.readouterr()
    assert main(["check-dataset", str(cfg)]) == 1  # one malformed row
    text = capsys.readouterr().out
    assert "[chosen: " in text and "[rejected: " in text and "trained part between >>> and <<<" in text
    assert ">>>" in text.split("[rejected: ")[1] and "[problem] dataset_map_fn failed on row 4" in text
    write_pairs(tmp_path / "mix.jsonl", mix_rows(4))
    assert main(["check", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "4 pairs kept of 4 rows" in text and "[rejected]" in text
    assert "reference: a frozen copy of the model as it starts" in text
    assert "(without a resident reference, as with LoRA:" in text and "batch 4 x 96 tokens" in text
    assert main(["check", str(cfg), "--cfg-options", "model.precompute_ref_log_probs=True"]) == 0
    text = capsys.readouterr().out
    assert "reference: log-probabilities precomputed before training" in text and "(without a resident" not in text
    assert main(["check", str(cfg), "--cfg-options", "model.type=lmtune.model.ORPO"]) == 0
    assert "ORPO (beta default), no reference model" in capsys.readouterr().out


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("trained_head", [False, True])
def test_token_log_probs_in_chunks_equal_the_full_logits(softcap, trained_head):
    from lmtune.model.loss import causal_lm_token_logps, linear_token_logps
    from lmtune.model.loss_kernels import LogitTransform

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(trained_head)  # frozen: the fused kernel; trained: checkpointed chunks
    transform = LogitTransform(softcap=softcap)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37)  # a sequence-level loss weighs each token differently
    got = linear_token_logps(hidden, head, targets, chunk_size=8, transform=transform)
    (got * weights).sum().backward()
    grads = [hidden.grad.clone()] + ([head.weight.grad.clone()] if trained_head else [])
    hidden.grad, head.weight.grad = None, None
    want = causal_lm_token_logps(transform(head(hidden)), targets)
    (want * weights).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(grads, [hidden.grad] + ([head.weight.grad] if trained_head else [])):
        assert torch.allclose(g, w, atol=1e-5)


def test_a_resumed_lora_dpo_run_reproduces_the_uninterrupted_one(tmp_path):
    import shutil

    from peft import LoraConfig

    from lmtune.engine import checkpoint as ckpt
    from lmtune.engine.runner import Runner

    settings = {"batch_size": 1, "max_iters": 4, "default_hooks.checkpoint.interval": 2,
                "model.lora": dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0),
                "optim_wrapper.optimizer": dict(type=torch.optim.AdamW, lr=1e-2)}
    whole, _ = preference_run(tmp_path, "whole", "DPO", **settings)
    assert whole.unwrapped_model.ref_llm is None  # the reference is the base with the adapters disabled
    assert [p.name for p in ckpt.list_checkpoints(whole.work_dir)] == ["iter_2", "iter_4"]
    part = tmp_path / "part"  # the run as a kill -9 after iteration 2 leaves it
    part.mkdir()
    shutil.copytree(whole.work_dir / "iter_2", part / "iter_2")
    (part / ckpt.POINTER).write_text("iter_2\n")
    resumed = Runner.from_config(whole.cfg, work_dir=str(part), resume=True)
    assert resumed.iter == 2
    resumed.train()
    a, b = trained(whole), trained(resumed)
    assert a.keys() == b.keys() and all("lora" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_precomputed_reference_log_probs_train_as_a_resident_reference_does(tmp_path, capsys):
    from lmtune.model.preference import sequence_keys

    resident, rows_resident = preference_run(tmp_path, "resident", "DPO", max_iters=2)
    assert resident.unwrapped_model.ref_llm is not None  # full fine-tuning: a frozen copy
    pre, rows_pre = preference_run(tmp_path, "pre", "DPO", max_iters=2, **{"model.precompute_ref_log_probs": True})
    model = pre.unwrapped_model
    assert model.ref_llm is None and len(model.reference_table) == 16  # 8 pairs: no second copy, a table
    assert "Reference log-probabilities of 16 training sequences computed" in capsys.readouterr().out
    a, b = trained(resident), trained(pre)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for x, y in zip(rows_resident, rows_pre, strict=True):
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-6) and x["loss"] == y["loss"]
    # the same reference and data again (a second run, a resumed one): the table comes from lmtune's cache
    again, _ = preference_run(tmp_path, "again", "DPO", max_iters=2, **{"model.precompute_ref_log_probs": True})
    assert "Reference log-probabilities of 16 training sequences loaded from the cache" in capsys.readouterr().out
    assert again.unwrapped_model.reference_table == model.reference_table
    # the key of a sequence is its tokens and labels, whatever row or packing it comes in
    rows = rows_of(TRL["dpo"]["pairs"])
    one = preference_collate_fn(rows)
    packed_batch = preference_collate_fn(packed(rows, 300), use_varlen_attn=True)
    keys = sequence_keys(one["input_ids"], one["labels"], one["sequence_index"])
    assert len(set(keys)) == 8 and sorted(keys) == sorted(sequence_keys(
        packed_batch["input_ids"], packed_batch["labels"], packed_batch["sequence_index"]))


def test_preference_validation_split_with_a_resident_or_a_precomputed_reference(tmp_path):
    settings = dict(max_iters=2, val_split=2, val_before_train=True, val_interval=1)
    _, rows_resident = preference_run(tmp_path, "vres", "DPO", **settings)
    _, rows_pre = preference_run(tmp_path, "vpre", "DPO", **settings, **{"model.precompute_ref_log_probs": True})
    res = {r["iter"]: r for r in rows_resident if "val/loss" in r}
    pre = {r["iter"]: r for r in rows_pre if "val/loss" in r}
    assert sorted(res) == sorted(pre) == [0, 1, 2]
    # before training the policy is its reference: every margin is 0 and the sigmoid loss is log 2
    assert res[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res[0]["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for it in res:  # the held-out pairs' reference from the table, as from the frozen copy (float noise of training)
        assert res[it]["val/loss"] == pytest.approx(pre[it]["val/loss"], rel=1e-5), it
        assert res[it]["val/rewards/margins"] == pytest.approx(pre[it]["val/rewards/margins"], abs=1e-5), it
    assert res[2]["val/loss"] != res[0]["val/loss"]
