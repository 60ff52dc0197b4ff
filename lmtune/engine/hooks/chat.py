"""Hooks that show the data and the model's answers to a person watching the run."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from lmtune.config.build import build
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.dist import broadcast_object, is_main_process
from lmtune.core.errors import ConfigError
from lmtune.core.hook import Hook
from lmtune.dataset.chat_template import has_chat_template, uses_chat_template
from lmtune.dataset.templates import get_template
from lmtune.engine.chat import ChatSession
from lmtune.engine.evaluation.answers import ANSWER_METRICS, answer_scores, mean_scores


class DatasetInfoHook(Hook):
    """Before training: the dataset size and the first sample of the first row decoded, with what is
    trained marked; the whole first row (all its packed samples) goes to ``<log_dir>/first_row.txt``.

    Masked (untrained) runs of the labels are shown as ``[masked: N tokens]``.
    """

    MAX_LINES = 30  # of the sample shown on the console; the file has it whole

    def __init__(self, tokenizer: Any, is_intern_repo_dataset: bool = False) -> None:
        self.tokenizer = tokenizer

    def before_train(self, runner) -> None:
        if not is_main_process():
            return
        tokenizer = build(self.tokenizer, key="DatasetInfoHook.tokenizer")
        dataset = runner.train_dataloader.dataset
        row = dataset[0]
        ids, labels = list(row["input_ids"]), list(row["labels"])
        lengths = list(row.get("num_tokens") or [len(ids)])
        path = runner.log_dir / "first_row.txt"
        path.write_text("[first row, input]\n" + tokenizer.decode(ids) + "\n\n[first row, trained tokens]\n"
                        + self.render_labels(tokenizer, labels) + "\n", encoding="utf-8")
        sample = lengths[0]
        where = (f"sample 1 of the {len(lengths)} packed into the first row ({sample} of its {len(ids)} tokens)"
                 if len(lengths) > 1 else f"the first row ({len(ids)} tokens)")
        if "pairs" in row:  # preference data: the first pair, both sequences (chosen first)
            sample = lengths[0] + lengths[1]
            where = (f"the first pair of the {row['pairs']} in the first row: chosen ({lengths[0]} tokens), then "
                     f"rejected ({lengths[1]})")
        runner.logger.info(f"Num train rows: {len(dataset)}")
        runner.logger.info(f"[{where}, input]\n" + self._head(tokenizer.decode(ids[:sample])))
        runner.logger.info(f"[{where}, trained tokens]\n"
                           + self._head(self.render_labels(tokenizer, labels[:sample]))
                           + f"\n(the whole first row: {path})")

    def _head(self, text: str) -> str:
        lines = text.splitlines()
        if len(lines) <= self.MAX_LINES:
            return text
        return "\n".join(lines[: self.MAX_LINES] + [f"... ({len(lines) - self.MAX_LINES} more lines)"])

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


CHAT_PREFIX = "chat/"
_INPUT_KEYS, _ANSWER_KEYS = ("input", "prompt", "question"), ("answer", "reference", "output")


def _inputs_and_references(value: Any) -> tuple[list[str], list[str | None]]:
    """The prompts of ``evaluation_inputs`` and their reference answers (None where a prompt has none)."""
    where = "EvaluateChatHook evaluation_inputs (the evaluation_inputs setting)"
    if isinstance(value, str) and value.endswith(".jsonl"):
        from pathlib import Path

        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        where, value = str(path), rows
    elif isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where} must be a list of prompts (strings, or dict(input=..., answer=...)) or a .jsonl "
                          f"file of such rows, got {value!r}")
    inputs, references = [], []
    for number, item in enumerate(value, 1):
        if isinstance(item, str):
            inputs.append(item)
            references.append(None)
            continue
        prompt = next((item[k] for k in _INPUT_KEYS if isinstance(item, dict) and k in item), None)
        answer = next((item[k] for k in _ANSWER_KEYS if isinstance(item, dict) and k in item), None)
        if not isinstance(prompt, str) or (answer is not None and not isinstance(answer, str)):
            raise ConfigError(f"{where}: item {number} must be a string or a dict with a string 'input' (or 'prompt') "
                              f"and optionally a string 'answer' (or 'reference'), got {item!r}")
        inputs.append(prompt)
        references.append(answer)
    return inputs, references


@contextlib.contextmanager
def _nowhere():
    yield None


class EvaluateChatHook(Hook):
    """Answers ``evaluation_inputs`` with the training template and system prompt.

    Runs before training, every ``every_n_iters`` iterations (at the end of the
    optimizer step holding that iteration) and after training;
    greedy decoding up to ``max_new_tokens`` or a stop word. Answers are logged
    and appended to ``<log_dir>/eval_chat.jsonl``. Each input is answered on its own
    by the chat session of ``lmtune chat`` (``lmtune.model.chat``), so a prompt here is
    the prompt there.

    ``prompt_template`` None or ``'auto'`` (as in training) uses the tokenizer's own
    chat template (``apply_chat_template(add_generation_prompt=True)``) and stops on
    its end-of-turn marker; a tokenizer without a chat template gets the bare input.

    Reference answers: an input may be ``dict(input=..., answer=...)`` (``prompt`` and
    ``reference``/``output`` are read too), or ``evaluation_inputs`` the path of a
    ``.jsonl`` file of such rows. Each evaluation then reports ``chat/exact_match``,
    ``chat/contains`` and ``chat/rouge_l`` (means over the inputs with an answer;
    ``lmtune.engine.evaluation.answers``): logged and tracked like validation scalars,
    usable by ``save_best`` and early stopping; each row of ``eval_chat.jsonl`` holds
    its reference and scores.
    """

    priority = "LOW"
    HEARTBEAT_S = 20.0

    def __init__(self, tokenizer: Any, evaluation_inputs: list[str] | str, evaluation_images: Any = None,
                 system: str = "", prompt_template: Any = None, every_n_iters: int | None = None,
                 max_new_tokens: int = 600, stop_word: str | None = None, stop_words: list[str] | None = None,
                 generation_kwargs: dict | None = None) -> None:
        self.tokenizer = tokenizer
        evaluation_inputs, self.references = _inputs_and_references(evaluation_inputs)
        if system is not None and not isinstance(system, str):
            raise ConfigError(f"EvaluateChatHook system (the SYSTEM setting) must be a string, got {system!r}")
        self.inputs = list(evaluation_inputs)
        self.system = system or ""
        self.template = None if uses_chat_template(prompt_template) else get_template(prompt_template)
        if every_n_iters is not None and (isinstance(every_n_iters, bool) or not isinstance(every_n_iters, int)):
            raise ValueError(f"every_n_iters (evaluation_freq) must be an integer, got {every_n_iters!r}")
        self.every_n_iters_ = every_n_iters
        self.max_new_tokens = max_new_tokens
        self.stop_words = list(stop_words or []) + ([stop_word] if stop_word else [])
        self.generation_kwargs = dict(generation_kwargs or {})

    def session(self, model: Any) -> ChatSession:
        """The chat session that answers the inputs with ``model``."""
        tokenizer = self.tokenizer = build(self.tokenizer, key="EvaluateChatHook.tokenizer")
        template = self.template
        if template is None and has_chat_template(tokenizer):
            template = "auto"
        return ChatSession(model, tokenizer, prompt_template=template, system=self.system,
                           max_new_tokens=self.max_new_tokens, stop_words=self.stop_words,
                           generation_kwargs=self.generation_kwargs)

    def generate(self, runner) -> list[str]:
        """The answers to every evaluation input."""
        return [answer for answer, _ in self.answers(runner)]

    def answers(self, runner, progress: Any = None):
        """Yield ``(answer, number of generated tokens)`` for each evaluation input, as each is done.

        ``progress``, if given, is called with the number of tokens generated so far for the current
        input, after every new token."""
        session = self.session(runner.unwrapped_model.llm)
        for text in self.inputs:
            session.reset()
            answer = session.chat(text, progress=progress, synced_gpus=runner.strategy.shards_params,
                                  context=runner.optim_wrapper.optim_context)
            yield answer, session.last_new_tokens

    def _evaluate(self, runner, when: str) -> None:
        """Answer the inputs, logging each answer as soon as it is complete; while one takes long, a line
        every ``HEARTBEAT_S`` seconds says how far it got (so a slow CPU run does not look hung)."""
        main = is_main_process()
        count = len(self.inputs)
        if main:
            runner.logger.info(f"Evaluate chat ({when}): {count} prompt{'s' if count != 1 else ''}, up to "
                               f"{self.max_new_tokens} new tokens each")
        started = time.monotonic()
        state = {"index": 0, "since": started}

        def progress(tokens: int) -> None:
            now = time.monotonic()
            if main and now - state["since"] >= self.HEARTBEAT_S:
                state["since"] = now
                runner.logger.info(f"  ... answer {state['index'] + 1}/{count}: {tokens} of at most "
                                   f"{self.max_new_tokens} tokens so far")

        scores = []
        with open(runner.log_dir / "eval_chat.jsonl", "a", encoding="utf-8") if main else _nowhere() as fh:
            answers = self.answers(runner, progress)
            for index, (text, reference, (answer, tokens)) in enumerate(zip(self.inputs, self.references, answers)):
                state["index"], state["since"] = index + 1, time.monotonic()
                record = {"iter": runner.completed_iters, "when": when, "input": text, "output": answer,
                          "new_tokens": tokens}
                if reference is not None:  # every rank generated the same answer: every rank scores it alike
                    record["reference"] = reference
                    record.update(answer_scores(answer, reference))
                    scores.append(record)
                if not main:
                    continue
                runner.logger.info(f"  Q: {text}\n  A: {answer}" + (f"\n  reference: {reference}"
                                                                   if reference is not None else ""))
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
        if main and time.monotonic() - started >= self.HEARTBEAT_S:
            runner.logger.info(f"Evaluate chat ({when}) took {time.monotonic() - started:.0f} s")
        if scores and not (when == "before training" and runner.completed_iters > 0):
            # (the answers that start a resumed run are shown, not reported: the uninterrupted run had none there)
            metrics = {f"{CHAT_PREFIX}{name}": value for name, value in mean_scores(scores).items()}
            # rank 0's scores on every rank: save_best and early stopping must decide alike everywhere, even if
            # one device's kernels made another answer
            runner.report_metrics(broadcast_object(metrics))

    def metric_names(self) -> list[str]:
        """What each evaluation reports (with reference answers)."""
        return [f"{CHAT_PREFIX}{name}" for name in ANSWER_METRICS] if any(r is not None for r in self.references) \
            else []

    def before_train(self, runner) -> None:
        self._evaluate(runner, "before training")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        # every `every_n_iters` iterations, at the end of the optimizer step holding that iteration: the weights
        # answered are those of a whole step (and the ones a checkpoint saved there holds)
        if self.every_n_iters_ and self.every_n_iters(runner, self.every_n_iters_) \
                and not self.is_last_iter(runner):
            self._due = True
        if getattr(self, "_due", False) and runner.at_step_boundary and not self.is_last_iter(runner):
            self._due = False
            self._evaluate(runner, f"iter {runner.iter + 1}")

    def after_train(self, runner) -> None:
        self._evaluate(runner, "after training")
