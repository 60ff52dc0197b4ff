"""TrainLoop: epochs of micro-batches grouped into optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lmtune.core.dist import all_reduce_sum, get_world_size
from lmtune.core.errors import ConfigError
from lmtune.engine.flops import sample_lengths
from lmtune.engine.runner.stop import StopTraining
from lmtune.engine.strategies.sequence_parallel import shard_batch
from lmtune.model.loss import loss_units


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm."""


def run_length(iters_per_epoch: int, max_epochs: int | None = None, max_iters: int | None = None) -> tuple[int, int]:
    """``(max_epochs, max_iters)`` of a run given one of them (``train_cfg``), checked."""
    if (max_epochs is None) == (max_iters is None):
        raise ConfigError("train_cfg needs exactly one of max_epochs and max_iters")
    for name, value in (("max_epochs", max_epochs), ("max_iters", max_iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"train_cfg.{name} must be a positive integer, got {value!r}")
    if max_epochs is not None:
        return max_epochs, max_epochs * iters_per_epoch
    return math.ceil(max_iters / iters_per_epoch), max_iters


def step_end(iter_in_epoch: int, iters_per_epoch: int, accumulative_counts: int, iters_left: int) -> int:
    """The position in the epoch where the optimizer step starting at ``iter_in_epoch`` ends: groups of
    ``accumulative_counts`` iterations counted from the epoch's start, cut by the epoch's end and the run's."""
    return min((iter_in_epoch // accumulative_counts + 1) * accumulative_counts, iters_per_epoch,
               iter_in_epoch + iters_left)


def optimizer_steps(iters: int, iters_per_epoch: int, accumulative_counts: int) -> int:
    """How many optimizer steps the first ``iters`` iterations of a run take (the loop's own grouping)."""
    def steps_of_epoch(length: int) -> int:  # an epoch cut after `length` iterations
        count = position = 0
        while position < length:
            position = step_end(position, iters_per_epoch, accumulative_counts, length - position)
            count += 1
        return count

    full, rest = divmod(iters, iters_per_epoch)
    return full * steps_of_epoch(iters_per_epoch) + steps_of_epoch(rest)


def micro_batch_size(dataloader) -> int:
    """Rows per iteration of ``dataloader``: its batch sampler's batch size, else its own."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    return int(getattr(batch_sampler, "batch_size", None) or dataloader.batch_size or 1)


class TrainLoop:
    """Runs ``max_epochs`` epochs (or ``max_iters`` iterations) of training.

    One iteration is one dataloader batch (a micro-batch), as in XTuner and
    MMEngine: ``save_steps``, ``evaluation_freq`` and the lr schedule count
    these. Consecutive groups of ``accumulative_counts`` iterations of an epoch
    form one optimizer step (the last group of an epoch may be shorter). Every
    micro-batch loss is divided by the number of target tokens of its whole
    step on all ranks, so a step's gradient is that of the mean over all of
    its tokens, however they are split into micro-batches and ranks.

    With a validation set (``runner.val_loop``), the run validates every
    ``val_interval`` iterations from ``val_begin`` on and at its last iteration,
    at the end of the optimizer step holding that iteration and before that
    iteration's hooks (so a checkpoint saved there holds what the validation
    decided). A hook may end the run early (``stop``, early stopping) at a step
    boundary.
    """

    def __init__(self, runner, dataloader, max_epochs: int | None = None, max_iters: int | None = None,
                 val_begin: int = 1, val_interval: int | None = None, accumulative_counts: int = 1) -> None:
        self.runner = runner
        self.dataloader = dataloader
        self.iters_per_epoch = len(dataloader)
        if self.iters_per_epoch == 0:
            raise ConfigError("the train dataloader is empty: the dataset has fewer rows than one batch")
        self.max_epochs, self.max_iters = run_length(self.iters_per_epoch, max_epochs, max_iters)
        self.accumulative_counts = accumulative_counts  # the optimizer wrapper's, checked there
        self.epoch = 0
        self.iter = 0  # completed iterations
        self.iter_in_epoch = 0
        self.in_after_iter = 0  # 1 while after_train_iter hooks run: that iteration is complete
        self.at_step_boundary = True  # the last micro-batch run ended an optimizer step
        for name, value in (("val_interval", val_interval), ("val_begin", val_begin)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"train_cfg.{name} must be a positive integer (iterations), got {value!r}")
        self.val_interval = val_interval  # None: the runner's default (save_steps)
        self.val_begin = val_begin
        self._val_pending = False
        self.stop_reason: str | None = None  # set by stop(): the run ends after the current step

    def stop(self, reason: str) -> None:
        """End the run at the end of the current optimizer step (its hooks and checkpoint still run)."""
        self.stop_reason = reason

    def _validation_due(self, completed: int) -> bool:
        if getattr(self.runner, "val_loop", None) is None or not self.val_interval or completed < self.val_begin:
            return False
        return completed % self.val_interval == 0 or completed >= self.max_iters

    @property
    def completed_iters(self) -> int:
        return self.iter + self.in_after_iter

    # -- position, for checkpoints ---------------------------------------
    def state_dict(self) -> dict:
        done = self.in_after_iter  # saved from an after_train_iter hook: count that iteration as done
        return {"epoch": self.epoch, "iter": self.iter + done, "iter_in_epoch": self.iter_in_epoch + done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.iter = int(state["epoch"]), int(state["iter"])
        self.iter_in_epoch = int(state["iter_in_epoch"])
        if self.iter_in_epoch >= self.iters_per_epoch:
            self.epoch, self.iter_in_epoch = self.epoch + 1, 0

    # -- running ----------------------------------------------------------
    def run(self):
        runner = self.runner
        runner.call_hook("before_train")
        val_loop = getattr(runner, "val_loop", None)
        if val_loop is not None and val_loop.val_before_train and self.iter == 0:
            runner.validate()
        while self.iter < self.max_iters and self.epoch < self.max_epochs and self.stop_reason is None:
            self.run_epoch()
        if self.stop_reason is not None:
            runner.logger.info(f"Training stopped at iteration {self.iter} of {self.max_iters}: {self.stop_reason}")
        runner.call_hook("after_train")
        return runner.model

    def _batches(self) -> Iterator[dict]:
        # the sampler and batch size behind the dataloader's batch sampler (its own or the config's)
        batch_sampler = getattr(self.dataloader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None) or getattr(self.dataloader, "sampler", None)
        if self.iter_in_epoch:
            if not hasattr(sampler, "skip"):
                raise ConfigError("resuming mid-epoch needs a sampler with skip() (use DefaultSampler)")
            sampler.skip(self.iter_in_epoch * micro_batch_size(self.dataloader))
        return iter(self.dataloader)

    def run_epoch(self) -> None:
        runner = self.runner
        runner.call_hook("before_train_epoch")
        batches = self._batches()
        while self.iter_in_epoch < self.iters_per_epoch and self.iter < self.max_iters and self.stop_reason is None:
            group_end = step_end(self.iter_in_epoch, self.iters_per_epoch, self.accumulative_counts,
                                 self.max_iters - self.iter)
            group = [next(batches) for _ in range(group_end - self.iter_in_epoch)]
            self.run_step(group)
        if self.iter_in_epoch < self.iters_per_epoch:
            return  # stopped by max_iters (or a hook) inside the epoch: a resume with more iterations continues it
        runner.call_hook("after_train_epoch")
        self.epoch += 1
        self.iter_in_epoch = 0

    def _report_skipped(self, outputs: dict) -> None:
        """Warn about a skipped non-finite step; stop the run after ``max_nonfinite_steps`` in a row."""
        optim = self.runner.optim_wrapper
        count, limit = optim.nonfinite_steps, optim.max_nonfinite_steps
        self.runner.logger.warning(
            f"iteration {self.iter + 1}: loss {outputs['loss']} / gradient norm {outputs['grad_norm']} is not "
            f"finite; optimizer step skipped ({count} in a row, the run stops at {limit})")
        if count >= limit:
            raise NonFiniteLossError(
                f"{count} optimizer steps in a row had a NaN/inf loss or gradient norm (last at iteration "
                f"{self.iter + 1}); stopping. Lower the learning rate, enable clip_grad or check the data; "
                "optim_wrapper.max_nonfinite_steps sets how many are tolerated. The checkpoints saved so far "
                "are intact.")

    def run_step(self, group: list[dict]) -> None:
        """One optimizer step over a group of micro-batches."""
        runner = self.runner
        model, optim = runner.model, runner.optim_wrapper
        group = [shard_batch(batch) for batch in group]  # this rank's slice of each row (sequence parallelism)
        units = [loss_units(batch) for batch in group]
        names = list(units[0])
        # one reduction for the step: its loss units (target tokens; pairs), a stop request (SIGTERM, Ctrl-C) on
        # any rank, and the non-pad input tokens of each micro-batch (for the logged tokens/s)
        stop = float(runner.stop_requests.requested is not None)
        local = [*(float(sum(u[name] for u in units)) for name in names), stop,
                 *(float(sum(sample_lengths(batch))) for batch in group)]
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=runner.device)).tolist()
        step_units = dict(zip(names, totals[:len(names)]))
        stops, input_tokens = totals[len(names)], totals[len(names) + 1:]
        if stops:
            raise StopTraining(f"{int(stops)} rank(s) were asked to stop")
        loss_finite = True
        for k, batch in enumerate(group):
            last = k == len(group) - 1
            runner.call_hook("before_train_iter", batch_idx=self.iter_in_epoch, data_batch=batch)
            inputs = {key: value.to(runner.device) if torch.is_tensor(value) else value
                      for key, value in batch.items()}
            with runner.strategy.micro_batch(model, last):
                with optim.optim_context():
                    out = model(**inputs)
                terms = out.get("loss_terms") or {"tokens": out["loss_sum"]}
                optim.backward(sum(term * (get_world_size() / max(step_units[unit], 1.0))
                                   for unit, term in terms.items()))
            outputs = self._outputs(out, terms, units[k])
            outputs["input_tokens"] = int(input_tokens[k])
            loss_finite = loss_finite and math.isfinite(outputs["loss_sum"])
            if last:
                outputs["grad_norm"] = optim.step(loss_finite=loss_finite)
                outputs["step_tokens"] = int(sum(input_tokens))  # non-pad input tokens of the step, all ranks
                outputs["step_target_tokens"] = step_units["tokens"]
                if getattr(optim, "skipped", False):
                    self._report_skipped(outputs)
            self.at_step_boundary = last
            self.in_after_iter = 1
            self._val_pending = self._val_pending or self._validation_due(self.iter + 1)
            if last and self._val_pending:
                self._val_pending = False
                runner.validate()
            runner.call_hook("after_train_iter", batch_idx=self.iter_in_epoch, data_batch=batch,
                             outputs=outputs)
            self.iter += 1
            self.iter_in_epoch += 1
            self.in_after_iter = 0

    @staticmethod
    def _outputs(out: dict, terms: dict, units: dict) -> dict:
        """The micro-batch's loss over all ranks (as in one process), and its metrics (``combine_sums``)."""
        values = local_sums(out, terms, units)
        if get_world_size() > 1:
            values = all_reduce_sum(values)
        return combine_sums(values.tolist(), list(terms), list(out.get("metrics") or {}))


def local_sums(out: dict, terms: dict, units: dict) -> torch.Tensor:
    """One batch's loss terms, the counts of their units, the model's metric sums and its pairs, as one fp64
    vector: summed over batches and ranks, then read by ``combine_sums``."""
    metrics = out.get("metrics") or {}
    local = [t.detach().double().reshape(()) for t in terms.values()]
    device = local[0].device
    local += [torch.tensor(float(units[unit]), dtype=torch.float64, device=device) for unit in terms]
    local += [m.detach().double().reshape(()) for m in metrics.values()]
    local.append(torch.tensor(float(units.get("pairs", 0)), dtype=torch.float64, device=device))
    return torch.stack(local)


def combine_sums(values: list[float], terms: list[str], metrics: list[str]) -> dict:
    """The loss and metrics of summed ``local_sums`` vectors.

    ``loss``: each term over its unit's count, summed; ``loss_sum`` and ``num_tokens``: that loss times the
    count of the first term's unit, and the count (so a window of iterations averages them as one batch).
    ``metrics``: the model's per-pair sums, as ``{name: (sum, pairs)}``.
    """
    n = len(terms)
    sums, counts, metric_sums, pairs = values[:n], values[n:2 * n], values[2 * n:-1], values[-1]
    loss = sum(total / max(count, 1.0) for total, count in zip(sums, counts))
    primary = counts[0]
    loss_sum = sums[0] if n == 1 else loss * primary
    outputs = {"loss": loss, "loss_sum": loss_sum, "num_tokens": int(primary)}
    if metrics:
        outputs["metrics"] = {name: (total, pairs) for name, total in zip(metrics, metric_sums)}
    return outputs
