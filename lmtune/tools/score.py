"""``lmtune score``: a reward model's scores for the conversations of a jsonl file.

The model is a reward model exported by ``lmtune convert pth_to_hf`` (a transformers sequence-classification
model whose config records its ``reward_token_id``). Each line holds a conversation as ``{"messages": [...]}``
(its last message is the response scored) or a preference pair ``{"prompt", "chosen", "rejected"}``; each is
tokenized exactly as ``build_preference_dataset(is_reward=True)`` does in training and scored at the reward
token. The output repeats each line with ``score`` (or ``score_chosen``, ``score_rejected`` and ``preferred``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from lmtune.core.errors import ConfigError


def load_reward_model(model_dir: str, trust_remote_code: bool = False):
    """``(model, tokenizer, reward_token_id)`` of an exported reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmtune.core.paths import check_model_path

    check_model_path(model_dir, "lmtune score", "give the directory `lmtune convert pth_to_hf` wrote")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    token = getattr(model.config, "reward_token_id", None)
    if token is None:
        raise ConfigError(f"{model_dir} records no reward_token_id in its config.json: is it a reward model "
                          "exported by `lmtune convert pth_to_hf`? Pass --reward-token-id")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code), int(token)


def score(model: Any, tokenizer: Any, messages: list[dict], reward_token_id: int) -> float:
    """The reward of one conversation (its last message is the response)."""
    import torch

    from lmtune.dataset.preference import reward_sequence

    ids = reward_sequence(tokenizer, messages, reward_token_id)
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def _pair_messages(row: dict, key: str) -> list[dict]:
    prompt, response = row["prompt"], row[key]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    response = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return prompt + response


def score_file(model_dir: str, data: str, out: TextIO, reward_token_id: int | None = None,
               trust_remote_code: bool = False) -> int:
    model, tokenizer, token = load_reward_model(model_dir, trust_remote_code)
    token = token if reward_token_id is None else reward_token_id
    if model.config.pad_token_id is not None and token == model.config.pad_token_id:
        raise ConfigError(f"the reward token {token} is the pad token: the model would not score it")
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{data}: no such file")
    count = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, list):
                row = {"messages": row}
            if "messages" in row:
                row["score"] = score(model, tokenizer, row["messages"], token)
            elif {"prompt", "chosen", "rejected"} <= set(row):
                row["score_chosen"] = score(model, tokenizer, _pair_messages(row, "chosen"), token)
                row["score_rejected"] = score(model, tokenizer, _pair_messages(row, "rejected"), token)
                row["preferred"] = "chosen" if row["score_chosen"] >= row["score_rejected"] else "rejected"
            else:
                raise ConfigError(f"fields {sorted(row)}: a line needs 'messages' or 'prompt', 'chosen' and "
                                  "'rejected'")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{data}: line {number} is not JSON ({exc.msg})") from None
        except ConfigError as exc:
            raise ConfigError(f"{data}: line {number}: {exc}") from None
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def _score_cmd(args: argparse.Namespace) -> int:
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            n = score_file(args.model, args.data, out, args.reward_token_id, args.trust_remote_code)
        print(f"scored {n} line(s): {args.out}")
    else:
        score_file(args.model, args.data, sys.stdout, args.reward_token_id, args.trust_remote_code)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("score", help="score the conversations of a jsonl file with a reward model")
    p.add_argument("model", help="a reward model exported by `lmtune convert pth_to_hf`")
    p.add_argument("data", help="jsonl: {'messages': [...]} or {'prompt', 'chosen', 'rejected'} a line")
    p.add_argument("--out", help="write the scored lines here (default: standard output)")
    p.add_argument("--reward-token-id", type=int, help="the reward token (default: the model config's)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.set_defaults(func=_score_cmd)
    return p
