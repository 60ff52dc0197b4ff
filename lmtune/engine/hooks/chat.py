"""Hooks that show the data and the model's answers to a person watching the run."""

from __future__ import annotations

import json
from typing import Any

import torch

from lmtune.config.build import build
from lmtune.dataset.chat_template import (
    chat_prompt_text,
    chat_template_end_ids,
    has_chat_template,
    uses_chat_template,
)
from lmtune.dataset.encode import encode_prompt
from lmtune.dataset.map_fns.template_map_fn import template_map_fn
from lmtune.engine.dist import is_main_process
from lmtune.engine.hooks.hook import Hook
from lmtune.utils.constants import IGNORE_INDEX
from lmtune.utils.templates import get_template


class DatasetInfoHook(Hook):
    """Before training: the dataset size and the first row decoded, with what is trained marked.

    Masked (untrained) runs of the labels are shown as ``[masked: N tokens]``.
    """

    def __init__(self, tokenizer: Any, is_intern_repo_dataset: bool = False) -> None:
        self.tokenizer = tokenizer

    def before_train(self, runner) -> None:
        if not is_main_process():
            return
        tokenizer = build(self.tokenizer, key="DatasetInfoHook.tokenizer")
        dataset = runner.train_dataloader.dataset
        row = dataset[0]
        runner.logger.info(f"Num train rows: {len(dataset)}")
        runner.logger.info("[first row, input]\n" + tokenizer.decode(row["input_ids"]))
        runner.logger.info("[first row, trained tokens]\n" + self.render_labels(tokenizer, row["labels"]))

    @staticmethod
    def render_labels(tokenizer, labels: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        masked = 0
        for label in list(labels) + [None]:
            if label == IGNORE_INDEX:
                if run:
                    parts.append(tokenizer.decode(run))
                    run = []
                masked += 1
                continue
            if masked:
                parts.append(f"[masked: {masked} tokens]")
                masked = 0
            if label is not None:
                run.append(label)
        if run:
            parts.append(tokenizer.decode(run))
        return "".join(parts)


class EvaluateChatHook(Hook):
    """Answers ``evaluation_inputs`` with the training template and system prompt.

    Runs before training, every ``every_n_iters`` iterations and after training;
    greedy decoding up to ``max_new_tokens`` or a stop word. Answers are logged
    and appended to ``<log_dir>/eval_chat.jsonl``.

    ``prompt_template`` None or ``'auto'`` (as in training) uses the tokenizer's own
    chat template (``apply_chat_template(add_generation_prompt=True)``) and stops on
    its end-of-turn marker; a tokenizer without a chat template gets the bare input.
    """

    priority = "LOW"

    def __init__(self, tokenizer: Any, evaluation_inputs: list[str] | str, evaluation_images: Any = None,
                 system: str = "", prompt_template: Any = None, every_n_iters: int | None = None,
                 max_new_tokens: int = 600, stop_word: str | None = None, stop_words: list[str] | None = None,
                 generation_kwargs: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.inputs = [evaluation_inputs] if isinstance(evaluation_inputs, str) else list(evaluation_inputs)
        self.system = system or ""
        self.use_chat_template = uses_chat_template(prompt_template)
        self.template = None if self.use_chat_template else get_template(prompt_template)
        if every_n_iters is not None and (isinstance(every_n_iters, bool) or not isinstance(every_n_iters, int)):
            raise ValueError(f"every_n_iters (evaluation_freq) must be an integer, got {every_n_iters!r}")
        self.every_n_iters_ = every_n_iters
        self.max_new_tokens = max_new_tokens
        stops = list(stop_words or [])
        if stop_word:
            stops.append(stop_word)
        if self.template is not None:
            stops += [w for w in self.template.get("STOP_WORDS", []) if w not in stops]
        self.stop_words = stops
        self.generation_kwargs = dict(generation_kwargs or {})

    def _prompt(self, text: str) -> str:
        """The prompt text for one evaluation input."""
        if self.template is None:
            tokenizer = self.tokenizer = build(self.tokenizer, key="EvaluateChatHook.tokenizer")
            if has_chat_template(tokenizer):
                return chat_prompt_text(tokenizer, text, self.system)
            return text
        turn = {"system": self.system, "input": text, "output": ""}
        return template_map_fn({"conversation": [turn]}, self.template)["conversation"][0]["input"]

    def _prompt_ids(self, tokenizer, text: str) -> list[int]:
        """Token ids of the prompt, tokenized as in training."""
        if self.template is None and has_chat_template(tokenizer):
            # as apply_chat_template(tokenize=True): the template writes any BOS itself
            return tokenizer.encode(self._prompt(text), add_special_tokens=False)
        return encode_prompt(tokenizer, self._prompt(text))

    @torch.no_grad()
    def generate(self, runner) -> list[str]:
        self.tokenizer = tokenizer = build(self.tokenizer, key="EvaluateChatHook.tokenizer")
        model = runner.unwrapped_model.llm
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        answers = []
        eos = [t for t in [tokenizer.eos_token_id] if t is not None]
        eos += [i for w in self.stop_words
                if (i := tokenizer.convert_tokens_to_ids(w)) is not None and i != tokenizer.unk_token_id]
        stop_words = list(self.stop_words)
        trim_words = stop_words + [tokenizer.eos_token or ""]
        if self.template is None and has_chat_template(tokenizer):
            markers = chat_template_end_ids(tokenizer)  # the template's end-of-turn marker
            eos += markers
            trim_words += tokenizer.convert_ids_to_tokens(markers)
        try:
            for text in self.inputs:
                ids = torch.tensor([self._prompt_ids(tokenizer, text)], device=device)
                kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=sorted(set(eos)) or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else (eos[0] if eos else 0))
                if stop_words:
                    kwargs.update(stop_strings=stop_words, tokenizer=tokenizer)
                if getattr(runner.strategy, "shards_params", False):
                    kwargs["synced_gpus"] = True  # every rank takes part in each forward until all are done
                kwargs.update(self.generation_kwargs)
                with runner.optim_wrapper.optim_context():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
                answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
                for word in trim_words:
                    if word and word in answer:
                        answer = answer.split(word)[0]
                answers.append(answer)
        finally:
            model.train(was_training)
        return answers

    def _evaluate(self, runner, when: str) -> None:
        answers = self.generate(runner)
        if not is_main_process():
            return
        lines = [f"Evaluate chat ({when}):"]
        with open(runner.log_dir / "eval_chat.jsonl", "a", encoding="utf-8") as fh:
            for text, answer in zip(self.inputs, answers):
                lines.append(f"  Q: {text}\n  A: {answer}")
                fh.write(json.dumps({"iter": runner.completed_iters, "when": when, "input": text,
                                     "output": answer}, ensure_ascii=False) + "\n")
        runner.logger.info("\n".join(lines))

    def before_train(self, runner) -> None:
        self._evaluate(runner, "before training")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.every_n_iters_ and self.every_n_iters(runner, self.every_n_iters_) \
                and not self.is_last_iter(runner):
            self._evaluate(runner, f"iter {runner.iter + 1}")

    def after_train(self, runner) -> None:
        self._evaluate(runner, "after training")
