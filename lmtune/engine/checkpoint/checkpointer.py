"""Checkpointer: what a checkpoint holds, how every rank writes it, and how a run takes it back.

The runner builds one and asks it three things: which checkpoint to start from (``resume`` /
``load_from``), to put that checkpoint's state into the built run, and to save the run
(``CheckpointHook`` decides when). The strategy gathers and scatters the weights and the optimizer
state; ``format`` writes and reads the directories.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmtune
from lmtune.core.dist import all_reduce_sum, decided_by_main_process, get_rank, get_world_size, is_main_process
from lmtune.core.errors import ConfigError
from lmtune.engine.checkpoint import format as ckpt
from lmtune.engine.checkpoint import lineage


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_digest(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()


class Checkpointer:
    """Saves and restores one run. ``last_saved_iter`` / ``last_saved_path`` (rank 0) say what it wrote.

    ``directory`` is where the run's checkpoints go (``CheckpointHook(out_dir=...)`` or the work dir);
    ``run_id`` names the run (``lineage``): drawn for a fresh run, adopted from the checkpoint on resume.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.last_saved_iter: int | None = None
        self.last_saved_path: Path | None = None
        self.directory: Path | None = None  # set by the runner once its hooks are built
        self.run_id: str = lineage.new_run_id()
        self.settings: dict[str, str] = {}

    @property
    def logger(self):
        return self.runner.logger

    # -- choosing and reading ---------------------------------------------
    def resume_path(self, resume: bool | str, load_from: str | None) -> Path | None:
        """The checkpoint to resume from: a given path, ``load_from``, or the run ``last_checkpoint`` names
        in the checkpoint directory (its newest sound checkpoint). Rank 0 decides; every rank gets its
        answer (or its error), so no two ranks resume different checkpoints."""
        if not resume:
            return None
        return decided_by_main_process(lambda: self._choose(resume, load_from))

    def _choose(self, resume: bool | str, load_from: str | None) -> Path | None:
        path = resume if isinstance(resume, (str, Path)) else load_from
        if path:
            path = Path(path)
            reason = ckpt.verify_checkpoint(path) if path.is_dir() else None
            if reason is not None:
                raise ConfigError(f"cannot resume from {path}: {reason}. Pick another checkpoint, or run "
                                  "--resume without a path to take the newest sound one")
            return path
        found = ckpt.find_latest(self.directory, warn=self.logger.warning)
        if found is None:
            self.logger.warning(f"resume: no checkpoint in {self.directory}; starting from scratch")
        return found

    def check_fresh(self, overwrite: bool) -> None:
        """A fresh run does not write into a directory that holds another run's checkpoints, unless told to.

        Rank 0 looks; every rank raises the same error, and takes rank 0's run id."""
        self.run_id = decided_by_main_process(lambda: self._check_fresh(overwrite))

    def _check_fresh(self, overwrite: bool) -> str:
        earlier = ckpt.list_checkpoints(self.directory)
        if earlier:
            newest = earlier[-1]
            run = ckpt.run_of(newest)
            what = f"{len(earlier)} checkpoint(s) of an earlier run (newest {newest.name}" + \
                   (f", run {run})" if run else ")")
            if not overwrite:
                raise ConfigError(f"{self.directory} holds {what}, which this run would write over: continue "
                                  "that run with --resume, choose another --work-dir, or pass --overwrite to start "
                                  "a new run there anyway")
            self.logger.warning(f"{self.directory} holds {what}; --overwrite: this run's checkpoints replace "
                                "same-named ones, the others are kept")
        return self.run_id

    def continue_run(self, path: Path, state: dict) -> None:
        """The resumed checkpoint's run becomes this run; its recorded settings must be this config's."""
        changed = lineage.settings_differences(state["meta"].get("resume_settings"), self.settings)
        if changed:
            raise ConfigError(f"{path} was trained with other settings than this config's ({'; '.join(changed)}). "
                              "A resumed run continues with the checkpoint's model, data, optimizer and schedule "
                              f"state, so these cannot change on --resume: drop the changes, or start a new run "
                              f"from its weights with --cfg-options load_from={str(path)!r} (and another "
                              "--work-dir)")
        self.run_id = state["meta"].get("run_id") or self.run_id

    @staticmethod
    def read(path: str | Path) -> dict:
        """A checkpoint's weights, this rank's optimizer state, trainer state and meta."""
        return ckpt.load_checkpoint(path, rank=get_rank())

    def check_strategy(self, path: Path, state: dict) -> None:
        """A checkpoint's optimizer state resumes under an engine that stores it the same way."""
        strategy = self.runner.strategy
        saved = state["meta"].get("strategy", "single")
        family = {"single": "torch", "ddp": "torch"}
        if family.get(saved, saved) != family.get(strategy.name, strategy.name):
            raise ConfigError(f"{path} was saved under {saved} and this run uses {strategy.name}: its optimizer "
                              f"state cannot be resumed here. Resume under {saved}, or use load_from={str(path)!r} "
                              "to start from its weights")
        shards = state["meta"].get("optimizer_shards")
        if shards and int(shards) != get_world_size():
            raise ConfigError(f"{path} holds optimizer state sharded over {shards} processes; resume with {shards} "
                              f"processes (this run has {get_world_size()}), or use load_from to start from its "
                              "weights")

    # -- putting a checkpoint into the run ---------------------------------
    def load_weights(self, model: torch.nn.Module, state: dict) -> None:
        """Checkpoint weights into the plain model, before the strategy wraps or shards it."""
        self.runner.strategy.load_trainable_state_dict(model, state["weights"])

    def restore(self, path: Path, state: dict) -> None:
        """Optimizer, schedulers, loop position and RNG of a built run: it continues where ``path`` left off."""
        runner = self.runner
        if state["optimizer"] is None:
            raise ConfigError(f"{path} was saved without optimizer state and cannot be resumed; "
                              "use load_from to start from its weights")
        if state["meta"].get("config_sha256") not in (None, config_digest(runner.config_text)):
            self.logger.warning(f"the config differs from the one {path} was trained with; resuming anyway")
        runner.strategy.load_optimizer_state_dict(runner.optim_wrapper, state["optimizer"]["optim_wrapper"])
        for scheduler, s_state in zip(runner.param_schedulers, state["optimizer"]["param_schedulers"]):
            scheduler.load_state_dict(s_state)
        runner.train_loop.load_state_dict(state["trainer"]["loop"])
        set_rng_state(state["trainer"]["rng"])
        self.last_saved_iter = runner.train_loop.iter
        runner.call_hook("after_load_checkpoint", checkpoint=state)
        loop = runner.train_loop
        self.logger.info(f"Resumed run {self.run_id} from {path} at iteration {loop.iter} of {loop.max_iters}")
        if loop.iter >= loop.max_iters or loop.epoch >= loop.max_epochs:
            self.logger.warning(f"{path} is the end of its run ({loop.iter} of {loop.max_iters} iterations): "
                                "nothing is left to train. To train longer, raise train_cfg.max_epochs or "
                                "max_iters (the schedule cannot change on resume), or start a new run from its "
                                f"weights with --cfg-options load_from={str(path)!r}")

    def load(self, path: str | Path, resume: bool = True) -> None:
        """Load weights (``resume=False``) or the whole training state into a built, unwrapped run."""
        runner = self.runner
        state = self.read(path)
        if resume:
            self.check_strategy(Path(path), state)
        if runner.strategy.shards_params or runner.model is not runner.unwrapped_model:
            raise ConfigError("load_checkpoint after the model is wrapped or sharded is not supported; pass "
                              "resume=/load_from= to the Runner instead")
        runner.unwrapped_model.load_trainable_state_dict(state["weights"])
        if resume:
            self.continue_run(Path(path), state)
            self.restore(Path(path), state)
        else:
            self.logger.info(f"Loaded weights from {path}")

    # -- saving ------------------------------------------------------------
    def save(self, out_dir: str | None = None, save_optimizer: bool = True) -> Path | None:
        """Write ``iter_N`` (N = completed iterations) atomically; returns its path on rank 0.

        Every rank calls it: the strategy gathers the weights (and optimizer state) from all
        ranks; rank 0 writes, together with the optimizer shard of each rank under FSDP2.
        An error on any rank raises on every rank, and nothing is left half-written.
        """
        runner, strategy = self.runner, self.runner.strategy
        step = runner.completed_iters
        work_dir = Path(out_dir) if out_dir else self.directory
        name = f"iter_{step}"
        weights = strategy.trainable_state_dict(runner.model)
        optimizer_state = None
        if save_optimizer:
            optimizer_state = strategy.optimizer_state_dict(runner.optim_wrapper)
            if optimizer_state is not None:
                optimizer_state = {"optim_wrapper": optimizer_state,
                                   "param_schedulers": [s.state_dict() for s in runner.param_schedulers]}
        trainer = {"loop": runner.train_loop.state_dict(), "rng": rng_state(), "seed": runner.seed}
        meta = {"lmtune_version": lmtune.__version__, "iter": step, "epoch": runner.train_loop.epoch,
                "seed": runner.seed, "config_sha256": config_digest(runner.config_text),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "strategy": strategy.name,
                "world_size": get_world_size(), "run_id": self.run_id, "optimizer": optimizer_state is not None,
                "resume_settings": self.settings}
        shards: dict[str, Path] = {}
        if save_optimizer and strategy.sharded_optimizer:
            meta["optimizer_shards"] = get_world_size()
            shards = {ckpt.optimizer_shard_name(r): ckpt.staged_shard_path(work_dir, name, r)
                      for r in range(get_world_size())}
            self._stage_shard(work_dir, name, optimizer_state)
            optimizer_state = None  # rank 0 moves every rank's shard in instead of writing optimizer.pt
        checkpoint = {"meta": meta, "trainer": trainer}
        runner.call_hook("before_save_checkpoint", checkpoint=checkpoint)
        path, error = None, None
        if is_main_process():
            try:
                path = ckpt.save_checkpoint(work_dir, name, weights, optimizer_state, trainer, meta,
                                            extra_files={"config.py": runner.config_text}, move_in=shards)
                self.logger.info(f"Saved checkpoint {path}")
                self._publish_config()
            except Exception as exc:  # noqa: BLE001 - told to every rank, raised on every rank
                error = exc
        self._raise_on_any_rank(error)
        self.last_saved_iter, self.last_saved_path = step, path
        return path

    def _publish_config(self) -> None:
        """The effective config beside the checkpoints (rank 0), once the run has saved one."""
        runner = self.runner
        target = runner.work_dir / f"{runner.config_name}.py"
        source = Path(getattr(runner.cfg, "filename", "")).resolve()
        if target.resolve() == source:
            self.logger.warning(f"not writing the effective config over {source} (the work dir holds the "
                                f"config itself); it is in {runner.log_dir}")
        else:
            target.write_text(runner.config_text, encoding="utf-8")

    def _stage_shard(self, work_dir: Path, name: str, state: dict | None) -> None:
        """Each rank writes its optimizer shard next to the checkpoint-to-be; rank 0 moves them in."""
        error = None
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_staged_shard(work_dir, name, get_rank(), state)
        except Exception as exc:  # noqa: BLE001
            error = exc
        self._raise_on_any_rank(error)

    def _raise_on_any_rank(self, error: Exception | None) -> None:
        failed = int(all_reduce_sum(torch.tensor(int(error is not None), device=self.runner.device)))
        if error is not None:
            raise error
        if failed:
            raise OSError(f"{failed} other rank(s) failed while saving the checkpoint (see their messages)")
