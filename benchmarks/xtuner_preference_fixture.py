"""Writes tests/fixtures/preference/xtuner_tokenized.json: how XTuner 0.2.0 tokenizes preference pairs.

Run in the XTuner environment (``bash benchmarks/setup_xtuner_env.sh``)::

    PYTHONPATH=benchmarks/xtuner_stubs benchmarks/.venv-xtuner/bin/python benchmarks/xtuner_preference_fixture.py

XTuner's own ``tokenize`` (DPO/ORPO pairs and reward pairs, rendered with the tokenizer's chat template) and
``tokenize_ref`` (POLAR's reference-conditioned reward data) run on a few rows with the tiny tokenizer of
tests/fixtures/preference/policy; the test checks that lmtune's ``build_preference_dataset`` gives the same
token ids, and trains the same positions.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from xtuner.dataset.preference_dataset import tokenize, tokenize_ref

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "preference"
REWARD_TOKEN = 5

ROWS = [
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is the sky blue"}],
     "chosen": [{"role": "assistant", "content": "the sky is blue"}],
     "rejected": [{"role": "assistant", "content": "grass is green"}]},
    {"prompt": [{"role": "user", "content": "name a fruit"}, {"role": "assistant", "content": "apples"},
                {"role": "user", "content": "another"}],
     "chosen": [{"role": "assistant", "content": "pears"}],
     "rejected": [{"role": "assistant", "content": "a red cat runs fast"}]},
]
POLAR_ROWS = [{**row, "reference": row["chosen"]} for row in ROWS]
POLAR_ROWS[0]["wrapper"], POLAR_ROWS[1]["wrapper"] = "sft", "pretrain"


def main() -> None:
    # saved by transformers 5 (TokenizersBackend), read here by transformers 4.48: the same tokenizer.json,
    # special tokens and chat template
    policy = FIXTURE / "policy"
    settings = json.loads((policy / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(policy / "tokenizer.json"),
        **{k: settings[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if settings.get(k)})
    tokenizer.chat_template = (policy / "chat_template.jinja").read_text()
    out = {"rows": ROWS, "polar_rows": POLAR_ROWS, "reward_token_id": REWARD_TOKEN, "max_length": 256,
           "max_response_length": 64,
           "dpo": [tokenize(row, tokenizer, 256) for row in ROWS],
           "reward": [tokenize(row, tokenizer, 256, is_reward=True, reward_token_id=REWARD_TOKEN) for row in ROWS],
           "polar": [tokenize_ref(row, tokenizer, 256, max_response_length=64, is_reward=True,
                                  reward_token_id=REWARD_TOKEN) for row in POLAR_ROWS]}
    (FIXTURE / "xtuner_tokenized.json").write_text(json.dumps(out) + "\n")
    print({k: [len(r["chosen_ids"]) for r in out[k]] for k in ("dpo", "reward", "polar")})


if __name__ == "__main__":
    main()
