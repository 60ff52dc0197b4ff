"""ValLoop: the held-out loss of a whole split (and any evaluator's metrics), exact however it is batched.

The loss is the sum of the token losses over every row of the split divided by its number of target tokens,
summed in fp64 over batches and ranks once at the end: the same value whether the split is packed or not, at
any batch size, on any number of ranks. The model's own loss path computes it (the chunked loss: no logits of
the whole batch are kept), under ``torch.no_grad`` with the model in eval mode, in the training precision.
Validation never changes the training run: the random state is put back afterwards, so a run with validation
trains exactly as one without.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lmtune.config.build import build
from lmtune.core.dist import all_reduce_sum, get_world_size, sequence_parallel_rank
from lmtune.core.errors import ConfigError
from lmtune.engine.runner.loops import combine_sums, local_sums
from lmtune.engine.strategies.sequence_parallel import shard_batch
from lmtune.model.loss import loss_units

VAL_PREFIX = "val/"


class ValLoop:
    """One pass over ``dataloader``: ``val/loss`` and ``val/ppl`` of its target tokens (preference models: their
    loss and the mean of their per-pair metrics), and the metrics of ``evaluator`` when one is given.

    ``evaluator``: an object with ``process(data_batch, logits)`` (``logits``: the next-token logits after each
    row's last input token, ``(rows, vocab)``), ``results`` (a list), ``compute(results) -> dict`` and ``prefix``
    (such as :class:`lmtune.engine.evaluation.MMLUMetric`). ``fp16`` is accepted for MMEngine configs: validation runs
    in the training precision. ``val_before_train``: validate once before the first iteration of a fresh run.
    """

    def __init__(self, runner: Any, dataloader: Any, evaluator: Any = None, fp16: bool = False,
                 val_before_train: bool = False) -> None:
        self.runner = runner
        self.dataloader = dataloader
        self.evaluator = build(evaluator, key="val_evaluator") if isinstance(evaluator, dict) else evaluator
        if isinstance(self.evaluator, (list, tuple)):
            raise ConfigError("val_evaluator: give one evaluator (a dict(type=...)), not a list")
        self.val_before_train = bool(val_before_train)
        self.last_seconds: float | None = None

    def metric_names(self) -> list[str]:
        """The names this loop reports (for checking ``save_best`` and early stopping before training)."""
        names = []
        if self.has_targets():
            names += [f"{VAL_PREFIX}loss", f"{VAL_PREFIX}tokens"]
            if not self.is_preference():
                names.append(f"{VAL_PREFIX}ppl")
        if self.evaluator is not None:
            prefix = getattr(self.evaluator, "prefix", None)
            known = getattr(self.evaluator, "metric_names", lambda: [])()
            names += [f"{prefix}/{name}" if prefix else name for name in known]
        return names

    def run(self) -> dict[str, float]:
        from lmtune.engine.checkpoint.checkpointer import rng_state, set_rng_state

        runner = self.runner
        model = runner.unwrapped_model
        started = time.perf_counter()
        saved_rng = rng_state()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self._pass(model)
        finally:
            model.train(was_training)
            set_rng_state(saved_rng)
        self.last_seconds = time.perf_counter() - started
        return metrics

    def is_preference(self) -> bool:
        """Pairs (a preference model's loss and per-pair metrics, no perplexity)."""
        return "pairs" in getattr(self.dataloader.dataset, "column_names", [])

    def has_targets(self) -> bool:
        """Whether the split's rows have target tokens (a loss): the first row decides, alike on every rank. An
        evaluator's split of prompts without answers (MMLU) has none."""
        if self.evaluator is None:
            return True
        from lmtune.core.constants import IGNORE_INDEX

        dataset = self.dataloader.dataset
        return len(dataset) > 0 and any(label != IGNORE_INDEX for label in list(dataset[0]["labels"])[1:])

    def _batches(self):
        """This rank's batches, then repeats of one of them, marked as padding, until every rank has run as
        many: a sharding strategy needs every rank in every forward, and a rank with fewer rows (or none, when
        the split has fewer rows than there are ranks) must still reach the final reduction."""
        batches = iter(self.dataloader)
        count = len(self.dataloader)
        most = count
        if get_world_size() > 1:
            most = _all_reduce_max(count, self.runner.device)
        first = None
        for _ in range(count):
            batch = next(batches)
            first = batch if first is None else first
            yield batch, False
        if most > count:
            if first is None:  # this rank has no rows: any row of the split serves as the padding
                dataset = self.dataloader.dataset
                first = self.dataloader.collate_fn([dataset[0]])
            for _ in range(most - count):
                yield first, True

    def _pass(self, model) -> dict[str, float]:
        runner = self.runner
        device = runner.device
        totals: torch.Tensor | None = None
        terms_names: list[str] = []
        metric_names: list[str] = []
        evaluator = self.evaluator
        if evaluator is not None:
            evaluator.results = []
        with_loss = self.has_targets()
        for whole, padding in self._batches():
            batch = shard_batch(whole) if with_loss else whole  # this rank's slice of each row (sequence parallelism)
            units = loss_units(batch)
            inputs = _to_device(batch, device)
            if with_loss:
                with runner.optim_wrapper.optim_context():
                    out = model(**inputs)
                terms = out.get("loss_terms") or {"tokens": out["loss_sum"]}
                values = local_sums(out, terms, units)
                if padding:
                    values = torch.zeros_like(values)
                terms_names, metric_names = list(terms), list(out.get("metrics") or {})
                totals = values if totals is None else totals + values
            if evaluator is not None:
                # whole rows: under sequence parallelism every rank of a group reads the group's rows whole (the
                # engines need every rank in every forward) and the group's first rank keeps the results
                rows = inputs if whole is batch else _to_device(whole, device)
                if "attention_mask" not in rows and rows["input_ids"].shape[0] > 1:
                    raise ConfigError("val_evaluator reads each row's last token, so batches of several rows need "
                                      "an attention_mask: use collate_fn=dict(type=mmlu_collate_fn) in "
                                      "val_dataloader (or batch_size=1)")
                with runner.optim_wrapper.optim_context():
                    logits = model.last_token_logits(rows["input_ids"], rows.get("attention_mask"))
                if not padding and sequence_parallel_rank() == 0:
                    evaluator.process(whole, logits.float().cpu())
        metrics: dict[str, float] = {}
        if totals is not None:
            if get_world_size() > 1:
                totals = all_reduce_sum(totals)
            combined = combine_sums(totals.tolist(), terms_names, metric_names)
            if combined["num_tokens"]:
                metrics[f"{VAL_PREFIX}loss"] = combined["loss"]
                if terms_names == ["tokens"]:
                    metrics[f"{VAL_PREFIX}ppl"] = math.exp(min(combined["loss"], 700.0))
                metrics[f"{VAL_PREFIX}tokens"] = int(combined["num_tokens"])
                for name, (total, pairs) in (combined.get("metrics") or {}).items():
                    if pairs:
                        metrics[f"{VAL_PREFIX}{name}"] = total / pairs
        if evaluator is not None:
            results = _gather(evaluator.results)
            prefix = getattr(evaluator, "prefix", None)
            for name, value in evaluator.compute(results).items():
                metrics[f"{prefix}/{name}" if prefix else name] = float(value)
        return metrics


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def _all_reduce_max(value: int, device: torch.device) -> int:
    tensor = torch.tensor([float(value)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def _gather(results: list) -> list:
    """Every rank's evaluator results, rank 0's first (the same list on every rank)."""
    if get_world_size() == 1:
        return list(results)
    gathered: list = [None] * get_world_size()
    torch.distributed.all_gather_object(gathered, list(results))
    return [item for part in gathered for item in part]


def data_configs(cfg: Any) -> tuple[Any, Any]:
    """``(train_dataloader, val_dataloader)`` configs of a run: ``val_dataloader`` as given (MMEngine), or the
    training dataloader's settings over ``val_dataset``, or over the held-out part of ``val_split`` (and then the
    training dataloader over the rest). ``val_dataloader`` None: the run does not validate."""
    from lmtune.dataset.holdout import parse_val_split, with_holdout

    train = cfg.get("train_dataloader")
    given = [key for key in ("val_dataloader", "val_dataset", "val_split") if cfg.get(key) is not None]
    if len(given) > 1:
        raise ConfigError(f"the config sets {' and '.join(given)}: give the validation data one way only")
    if not given:
        return train, None
    if given[0] == "val_dataloader":
        return train, cfg.get("val_dataloader")
    if not isinstance(train, dict) or "dataset" not in train:
        raise ConfigError(f"{given[0]} takes the training dataloader's settings, so train_dataloader must be a "
                          "config dict with a dataset; give val_dataloader = dict(dataset=..., ...) instead")
    loader = {key: value for key, value in train.items() if key not in ("sampler", "batch_sampler")}
    if given[0] == "val_dataset":
        return train, {**loader, "dataset": cfg.get("val_dataset")}
    split = parse_val_split(cfg.get("val_split"))
    return ({**train, "dataset": with_holdout(train["dataset"], split, "train")},
            {**loader, "dataset": with_holdout(train["dataset"], split, "val")})


def build_val_loop(cfg: Any, runner: Any, dataloader: Any) -> ValLoop | None:
    """The run's ValLoop (``val_cfg``, MMEngine's; ``type='ValLoop'`` or none means lmtune's) over ``dataloader``,
    with ``val_evaluator``; None without validation data. ``val_before_train`` may also be a top-level setting."""
    if dataloader is None:
        if cfg.get("val_evaluator") is not None:
            raise ConfigError("val_evaluator is set but the config has no validation data: add val_dataloader "
                              "(or val_dataset / val_split)")
        return None
    val_cfg = dict(cfg.get("val_cfg") or {})
    if val_cfg.get("type") in (None, "ValLoop", "mmengine.runner.ValLoop"):
        val_cfg["type"] = ValLoop
    if cfg.get("val_before_train") is not None:
        val_cfg.setdefault("val_before_train", cfg.get("val_before_train"))
    evaluator = cfg.get("val_evaluator")
    if evaluator is not None:
        val_cfg["evaluator"] = evaluator
    return build(val_cfg, key="val_cfg", runner=runner, dataloader=dataloader)


def val_interval(cfg: Any, loop_interval: int | None, save_steps: int | None, iters_per_epoch: int) -> int:
    """Iterations between validations: ``train_cfg.val_interval``, else the top-level ``val_interval``, else
    ``save_steps`` (the checkpoint interval in iterations), else once per epoch."""
    top = cfg.get("val_interval")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"val_interval must be a positive integer (iterations between validations), got {top!r}")
    return int(loop_interval or top or save_steps or iters_per_epoch)


def evaluation_hooks(cfg: Any) -> list:
    """Hooks the top-level one-line settings ask for: ``early_stopping = dict(monitor=..., patience=...)``."""
    from lmtune.engine.hooks.early_stopping import EarlyStoppingHook

    early = cfg.get("early_stopping")
    if early is None:
        return []
    if not isinstance(early, dict) or "monitor" not in early:
        raise ConfigError(f"early_stopping must be dict(monitor='val/loss', patience=N, min_delta=...), got {early!r}")
    return [{"type": EarlyStoppingHook, **{k: v for k, v in early.items() if k != "type"}}]


def apply_save_best(cfg: Any, hooks: list) -> None:
    """The top-level ``save_best = 'val/loss'``: the checkpoint hook keeps the best checkpoint of that metric."""
    from lmtune.engine.checkpoint.hook import CheckpointHook

    name = cfg.get("save_best")
    if name is None:
        return
    if not isinstance(name, str):
        raise ConfigError(f"save_best must be a metric name such as 'val/loss', got {name!r}")
    hook = next((h for h in hooks if isinstance(h, CheckpointHook)), None)
    if hook is None:
        raise ConfigError("save_best needs the checkpoint hook (default_hooks.checkpoint), which the config removed")
    if hook.save_best not in (None, name):
        raise ConfigError(f"save_best={name!r} and default_hooks.checkpoint.save_best={hook.save_best!r} disagree: "
                          "keep one")
    hook.save_best = name


def check_monitors(runner: Any) -> None:
    """``save_best`` and early stopping watch metrics some evaluation of this run reports: checked before
    training, so a typo does not silently keep no best checkpoint."""
    from lmtune.engine.checkpoint.hook import CheckpointHook
    from lmtune.engine.hooks.early_stopping import EarlyStoppingHook

    watched = []
    for hook in runner.hooks:
        if isinstance(hook, CheckpointHook) and hook.save_best not in (None, "auto"):
            watched.append(("save_best", hook.save_best))
        if isinstance(hook, EarlyStoppingHook):
            watched.append(("early_stopping monitor", hook.monitor))
    if not watched:
        return
    names, prefixes = set(), set()
    if runner.val_loop is not None:
        names.update(runner.val_loop.metric_names())
        evaluator = runner.val_loop.evaluator
        if evaluator is not None and not hasattr(evaluator, "metric_names"):
            if not getattr(evaluator, "prefix", None):
                return  # its names are known only once it reports
            prefixes.add(f"{evaluator.prefix}/")
        if runner.val_loop.is_preference():
            prefixes.add(VAL_PREFIX)  # the model's per-pair metrics, val/rewards/...
    for hook in runner.hooks:
        if hasattr(hook, "metric_names") and not isinstance(hook, EarlyStoppingHook):
            names.update(hook.metric_names())
    for what, name in watched:
        if name in names or any(name.startswith(p) for p in prefixes):
            continue
        if not names:
            raise ConfigError(f"{what}={name!r}: this run evaluates nothing. Add validation data (val_dataloader, "
                              "val_dataset or val_split) or reference answers to EvaluateChatHook")
        raise ConfigError(f"{what}={name!r} is never logged by this run; it logs {sorted(names)}")
