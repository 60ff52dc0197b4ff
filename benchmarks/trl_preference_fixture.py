"""Writes tests/fixtures/preference/: TRL's losses and metrics on fixed pairs, for lmtune's exactness tests.

Run in the TRL environment (``bash benchmarks/setup_trl_env.sh``)::

    benchmarks/.venv-trl/bin/python benchmarks/trl_preference_fixture.py

It makes a tiny BPE tokenizer (ChatML template; lmtune's own ``train_bpe_tokenizer``), a tiny Llama policy
and a differently seeded reference (fp32, random weights), and four conversational pairs of different
lengths. TRL tokenizes the pairs itself; the token ids it trains on are written beside each result, so the
test feeds lmtune exactly the same tokens. For every loss type lmtune and TRL share, TRL's trainer computes
the loss of the whole batch and logs its metrics:

* ``DPOTrainer``: sigmoid, hinge, ipo, robust (label smoothing 0.1), sppo_hard, nca_pair, bco_pair, against
  the separate reference model;
* ``ORPOTrainer`` (``trl.experimental.orpo``), beta 0.1;
* ``CPOTrainer`` (``trl.experimental.cpo``) with ``loss_type='simpo'``, beta 2.0, gamma 0.5, ``cpo_alpha=0``
  (SimPO);
* ``RewardTrainer`` on the policy's sequence-classification twin (its ``score`` head set to fixed values),
  each sequence ending with the reward token.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "preference"
sys.path.insert(0, str(REPO))  # lmtune's tokenizer factory: it needs only tokenizers and transformers

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lmtune.tools.tiny_model import train_bpe_tokenizer  # noqa: E402

WORDS = "the sky is blue grass green apples pears red yellow cat dog runs fast slow big small".split()
DPO_LOSSES = {"sigmoid": 0.0, "hinge": 0.0, "ipo": 0.0, "robust": 0.1, "sppo_hard": 0.0, "nca_pair": 0.0,
              "bco_pair": 0.0}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def pairs() -> list[dict]:
    rng = random.Random(3)
    out = []
    for n in range(4):
        def text(lo, hi):
            return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))
        out.append({"prompt": [{"role": "user", "content": text(2, 6 + 2 * n)}],
                    "chosen": [{"role": "assistant", "content": text(1, 4 + 3 * n)}],
                    "rejected": [{"role": "assistant", "content": text(1, 9)}]})
    return out


def models(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # larger weights than the initialiser's: log-probabilities that differ visibly
            for p in model.parameters():
                p.mul_(4.0 if p.dim() > 1 else 1.0)
        model.save_pretrained(OUT / name)
    tokenizer.save_pretrained(OUT / "policy")


def trl_args(cls, work: str, **kw):
    return cls(output_dir=work, report_to=[], per_device_train_batch_size=4, bf16=False, fp16=False,
               use_cpu=True, **kw)


def last(metrics: dict, mode: str = "train") -> dict:
    return {k: float(v[-1]) for k, v in metrics[mode].items() if k in METRICS and v}


def dpo(tokenizer, data, work) -> tuple[list[dict], dict]:
    from trl import DPOConfig, DPOTrainer

    results, ids = {}, None
    for loss_type, smoothing in DPO_LOSSES.items():
        policy = AutoModelForCausalLM.from_pretrained(OUT / "policy", dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(OUT / "ref", dtype=torch.float32)
        args = trl_args(DPOConfig, work, loss_type=[loss_type], beta=0.1, label_smoothing=smoothing,
                        max_length=None)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                             processing_class=tokenizer)
        rows = [trainer.train_dataset[i] for i in range(len(data))]
        ids = [{k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
        batch = trainer.data_collator(rows)
        policy.train()
        loss = trainer.compute_loss(policy, batch)
        results[loss_type] = {"label_smoothing": smoothing, "loss": float(loss), **last(trainer._metrics)}
    return ids, results


def ref_free(kind: str, tokenizer, data, work):
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
        extra = dict(beta=0.1)
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
        extra = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)
    policy = AutoModelForCausalLM.from_pretrained(OUT / "policy", dtype=torch.float32)
    trainer = Trainer(model=policy, args=trl_args(Config, work, max_length=256,
                                                  **extra),
                      train_dataset=data, processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(data))]
    ids = []
    for r in rows:
        prompt = list(r["prompt_input_ids"])
        chosen, rejected = list(r["chosen_input_ids"]), list(r["rejected_input_ids"])
        # the responses are the labelled tokens; the prompt is what precedes them
        c_start = next(i for i, label in enumerate(r["chosen_labels"]) if label != -100)
        r_start = next(i for i, label in enumerate(r["rejected_labels"]) if label != -100)
        assert chosen[:c_start] == rejected[:r_start], "the prompt differs between the responses"
        ids.append({"prompt_ids": chosen[:c_start], "chosen_ids": chosen[c_start:],
                    "rejected_ids": rejected[r_start:], "trl_prompt_ids": prompt})
    batch = trainer.data_collator(rows)
    policy.train()
    loss, metrics = trainer.get_batch_loss_metrics(policy, batch, train_eval="train")
    out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items() if k in METRICS}}
    if kind == "orpo":
        out.update({k: float(metrics[k]) for k in ("log_odds_ratio", "log_odds_chosen", "nll_loss")})
    return ids, {**extra, **out}


def reward(tokenizer, ids, work):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    reward_token = tokenizer.convert_tokens_to_ids("<|im_end|>")  # a token the sequences never end with here
    model = AutoModelForSequenceClassification.from_pretrained(OUT / "policy", num_labels=1, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn_like(model.score.weight) * 0.5)
    torch.save({"score.weight": model.score.weight.detach().clone()}, OUT / "reward_head.pt")
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [{"chosen_ids": p["prompt_ids"] + p["chosen_ids"] + [reward_token],
             "rejected_ids": p["prompt_ids"] + p["rejected_ids"] + [reward_token]} for p in ids]
    data = Dataset.from_list(rows)
    trainer = RewardTrainer(model=model, args=trl_args(RewardConfig, work, center_rewards_coefficient=None),
                            train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train()
    loss = trainer.compute_loss(model, batch)
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v and k != "num_tokens"}
    return {"reward_token_id": reward_token, "rows": rows, "loss": float(loss), **metrics}


def main() -> None:
    import transformers
    import trl

    OUT.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(WORDS)] * 4
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=128)
    models(tokenizer)
    data = Dataset.from_list(pairs())
    with tempfile.TemporaryDirectory() as work:
        dpo_ids, dpo_results = dpo(tokenizer, data, work)
        orpo_ids, orpo_result = ref_free("orpo", tokenizer, data, work)
        simpo_ids, simpo_result = ref_free("simpo", tokenizer, data, work)
        reward_result = reward(tokenizer, dpo_ids, work)
    fixture = {"made_by": f"benchmarks/trl_preference_fixture.py with trl {trl.__version__}, transformers "
                          f"{transformers.__version__}, torch {torch.__version__}",
               "dpo": {"pairs": dpo_ids, "beta": 0.1, "losses": dpo_results},
               "orpo": {"pairs": orpo_ids, **orpo_result},
               "simpo": {"pairs": simpo_ids, **simpo_result},
               "reward": reward_result}
    (OUT / "trl_reference.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(json.dumps({k: v for k, v in fixture.items() if k != "reward"}, indent=1)[:3000])
    print("reward", {k: v for k, v in reward_result.items() if k != "rows"})


if __name__ == "__main__":
    main()
