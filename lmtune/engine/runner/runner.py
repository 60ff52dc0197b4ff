"""Runner: builds everything a config describes and runs the training loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmtune
from lmtune.config import Config, ConfigDict, ConfigError, build, dumps
from lmtune.core.device import default_device
from lmtune.core.dist import (
    barrier,
    broadcast_object,
    data_parallel_world_size,
    decided_by_main_process,
    get_world_size,
    init_sequence_parallel,
    is_main_process,
    sequence_parallel_size,
)
from lmtune.engine.checkpoint import Checkpointer
from lmtune.engine.checkpoint.lineage import resume_settings
from lmtune.engine.optim import StepSettings
from lmtune.engine.runner.lock import WorkDirLock
from lmtune.engine.runner.loops import TrainLoop, micro_batch_size
from lmtune.engine.runner.parts import (
    build_dataloader,
    build_hooks,
    build_optim_wrapper,
    build_schedulers,
    check_optimizer_and_schedule,
)
from lmtune.engine.runner.setup import MessageHub, check_top_level_keys, set_random_seed, setup_logger
from lmtune.engine.runner.stop import RunStopped, StopRequests, StopTraining
from lmtune.engine.runner.validation import (
    apply_save_best,
    build_val_loop,
    check_monitors,
    data_configs,
    evaluation_hooks,
    val_interval,
)
from lmtune.engine.strategies import build_strategy
from lmtune.engine.strategies.sequence_parallel import check_sequence_parallel

logger = logging.getLogger("lmtune")

# A packed sample's logits may differ from the same sample run alone by float noise only (4-bit and bf16
# kernels included); attention that leaks across samples changes them by far more.
PACKING_LEAK_TOLERANCE = 0.02

class Runner:
    """Everything one training run needs, built from a config.

    Build order: seed, dataset and dataloader, model, optimizer, schedulers,
    loop, hooks; then an optional checkpoint is loaded (``resume`` continues
    the run, ``load_from`` alone only initialises the weights).
    """

    def __init__(self, cfg: Config, work_dir: str | None = None, seed: int | None = None,
                 resume: bool | str | None = None, load_from: str | None = None, strategy: Any = None,
                 deepspeed: str | None = None, overwrite: bool = False) -> None:
        from lmtune.config.model_resource import apply_model_resource

        cfg = apply_model_resource(cfg)  # download before anything is built; rank 0 downloads, the others wait
        self.cfg = cfg
        self.device = default_device()
        self.message_hub = MessageHub()
        self.checkpointer = Checkpointer(self)
        self.stop_requests = StopRequests()
        self._locks: list[WorkDirLock] = []
        name = Path(getattr(cfg, "filename", "config.py")).stem
        self.work_dir = Path(work_dir or cfg.get("work_dir") or Path("work_dirs") / name).resolve()
        self._made_work_dir = not self.work_dir.exists()
        self.timestamp, self.log_dir = self._new_log_dir()
        barrier()
        try:
            self._build(cfg, name, seed, resume, load_from, strategy, deepspeed, overwrite)
        except BaseException:
            self._release_locks()
            self._discard_log_dir()
            raise

    def _build(self, cfg: Config, name: str, seed: int | None, resume: bool | str | None, load_from: str | None,
               strategy: Any, deepspeed: str | None, overwrite: bool) -> None:
        self.logger = setup_logger(self.log_dir / f"{self.timestamp}.log", cfg.get("log_level", "INFO"))
        check_top_level_keys(cfg)
        env_cfg = dict(cfg.get("env_cfg") or {})
        torch.backends.cudnn.benchmark = bool(env_cfg.get("cudnn_benchmark", False))
        self.mp_start_method = dict(env_cfg.get("mp_cfg") or {}).get("mp_start_method")
        from lmtune.engine.logging.visualization import (
            build_visualizer,  # TensorBoard/W&B/MLflow: a missing package fails here
        )

        self.visualizer = build_visualizer(cfg.get("visualizer"), self.log_dir, cfg)

        # hooks first: their settings are checked before any data or weights are loaded, and the checkpoint
        # hook says where this run's checkpoints are
        self.hooks = build_hooks(cfg.get("default_hooks"), list(cfg.get("custom_hooks") or []) + evaluation_hooks(cfg),
                                 self.device)
        apply_save_best(cfg, self.hooks)
        self.checkpointer.directory = self._checkpoint_dir()
        self._lock_dirs()
        self.checkpointer.settings = resume_settings(cfg)
        resume = cfg.get("resume", False) if resume is None else resume
        load_from = load_from or cfg.get("load_from")
        self.resume_from = self.checkpointer.resume_path(resume, load_from)
        self._resume_state = self.checkpointer.read(self.resume_from) if self.resume_from else None
        if self._resume_state is None or self.resume_from.resolve().parent != self.checkpointer.directory:
            self.checkpointer.check_fresh(overwrite)  # a run from elsewhere must not write over this dir's run
        if self._resume_state is not None:
            self.checkpointer.continue_run(self.resume_from, self._resume_state)
        randomness = dict(cfg.get("randomness") or {})
        if self._resume_state is not None:  # the resumed run is the same run: same seed, same data order
            saved = int(self._resume_state["trainer"]["seed"])
            if seed is not None and int(seed) != saved:
                self.logger.warning(f"--seed {seed} ignored: resuming continues the run of seed {saved}")
            seed = saved
        self.seed = self._choose_seed(seed if seed is not None else randomness.get("seed"))
        set_random_seed(self.seed, bool(randomness.get("deterministic", False)))
        self.config_text = self._dump_config(name, randomness)
        self.strategy = build_strategy(cfg, self.device, strategy, deepspeed)
        # sequence parallelism: its groups before the samplers are built (they shard by the data-parallel rank)
        init_sequence_parallel(cfg.get("sequence_parallel_size") or 1)
        if sequence_parallel_size() > 1:
            self.logger.info(f"Sequence parallelism: each row split over {sequence_parallel_size()} ranks, "
                             f"{data_parallel_world_size()} data-parallel group(s)")
        self.logger.info(f"lmtune {lmtune.__version__}  work_dir: {self.work_dir}  seed: {self.seed}  "
                         f"device: {self.device}  strategy: {self.strategy.name}  world size: {get_world_size()}")

        # a model whose hub code cannot run here stops the run now, before any data is processed
        from lmtune.model.ports import check_model_config

        check_model_config(cfg.get("model"))
        # what an optimizer step is, and the optimizer's and schedules' values: checked before any data loads
        step = StepSettings.from_config(cfg.get("optim_wrapper"))
        check_optimizer_and_schedule(cfg.get("optim_wrapper"), cfg.get("param_scheduler"))
        train_loader_cfg, val_loader_cfg = data_configs(cfg)
        self.train_dataloader = build_dataloader(train_loader_cfg, self.seed, self.device, self.mp_start_method)
        self.val_dataloader = None
        if val_loader_cfg is not None:
            self.val_dataloader = build_dataloader(val_loader_cfg, self.seed, self.device, self.mp_start_method,
                                                   key="val_dataloader")
        self.strategy.configure(micro_batch_size(self.train_dataloader), step)  # DeepSpeed fills its JSON
        model = self._build_model(self.strategy.model_config(cfg.get("model")))
        check_sequence_parallel(model)
        if getattr(model, "precompute_ref_log_probs", False):
            self._precompute_reference(model, cfg, train_loader_cfg, val_loader_cfg)
        # checkpoint weights go into the plain model, before it is wrapped or sharded
        if self._resume_state is not None:
            self.checkpointer.check_strategy(self.resume_from, self._resume_state)
            self.checkpointer.load_weights(model, self._resume_state)
        elif load_from:
            self.checkpointer.load_weights(model, self.checkpointer.read(load_from))
            self.logger.info(f"Loaded weights from {load_from}")
        self.model = self.strategy.wrap_model(model)
        self.optim_wrapper = build_optim_wrapper(cfg.get("optim_wrapper"),
                                                 [p for p in self.model.parameters() if p.requires_grad])
        self.model, self.optim_wrapper = self.strategy.prepare(self.model, self.optim_wrapper, self)
        self.param_schedulers = build_schedulers(cfg.get("param_scheduler"), self.optim_wrapper,
                                                 len(self.train_dataloader))
        train_cfg = dict(cfg.get("train_cfg") or {})
        train_cfg.pop("by_epoch", None)
        train_cfg.setdefault("type", TrainLoop)
        self.train_loop = build(train_cfg, key="train_cfg", runner=self, dataloader=self.train_dataloader,
                                accumulative_counts=self.optim_wrapper.accumulative_counts)
        self.val_loop = build_val_loop(cfg, self, self.val_dataloader)
        if self.val_loop is not None:
            self.train_loop.val_interval = val_interval(cfg, self.train_loop.val_interval, self._save_steps(),
                                                        self.train_loop.iters_per_epoch)
            self.logger.info(f"Validation: {len(self.val_dataloader.dataset):,} row(s), every "
                             f"{self.train_loop.val_interval} iterations and at the end")
        check_monitors(self)

        if self._resume_state is not None:
            self.checkpointer.restore(self.resume_from, self._resume_state)
        self._resume_state = None

    def _save_steps(self) -> int | None:
        from lmtune.engine.checkpoint.hook import CheckpointHook

        hook = next((h for h in self.hooks if isinstance(h, CheckpointHook)), None)
        return hook.interval if hook is not None and not hook.by_epoch and hook.interval > 0 else None

    def _lock_dirs(self) -> None:
        """Rank 0 locks the work dir (and a separate checkpoint dir) for the life of the run; every rank
        raises the same error when another live run holds one."""
        decided_by_main_process(self._acquire_locks)

    def _acquire_locks(self) -> None:
        for directory in dict.fromkeys([self.work_dir, self.checkpointer.directory]):
            lock = WorkDirLock(directory)
            lock.acquire()
            self._locks.append(lock)
            if lock.previous_holder:
                self.logger.info(f"took over the stale lock of {directory} (its run, {lock.previous_holder}, "
                                 "has ended)")

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    def _checkpoint_dir(self) -> Path:
        from lmtune.engine.checkpoint.hook import CheckpointHook

        out_dirs = [hook.out_dir for hook in self.hooks if isinstance(hook, CheckpointHook) and hook.out_dir]
        return Path(out_dirs[0]).resolve() if out_dirs else self.work_dir

    def _dump_config(self, name: str, randomness: dict) -> str:
        """Write the effective config (overrides applied, the seed actually used) as Python."""
        effective = ConfigDict(self.cfg)
        effective["randomness"] = {**randomness, "seed": self.seed}
        try:
            text = dumps(effective)
        except ConfigError as exc:
            text = getattr(self.cfg, "source", None) or repr(self.cfg)
            self.logger.warning(f"The effective config cannot be written as Python ({exc}); "
                                "the work dir gets the original file instead.")
        if is_main_process():
            (self.log_dir / f"{name}.py").write_text(text, encoding="utf-8")
        self.config_name = name
        return text

    def _discard_log_dir(self) -> None:
        """A run that fails before its first iteration leaves no trace in the work dir: its log dir (log,
        config copy, first row) and the work dir itself when the run made it and nothing else is there. The
        error is on the console; the work dir holds records of runs that trained."""
        import shutil

        if not is_main_process():
            return
        self._close_log_file()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        if self._made_work_dir:
            try:
                self.work_dir.rmdir()  # only if empty
            except OSError:
                pass

    def _close_log_file(self) -> None:
        for handler in list(self.logger.handlers if hasattr(self, "logger") else []):
            if isinstance(handler, logging.FileHandler) and getattr(handler, "_lmtune", False):
                self.logger.removeHandler(handler)
                handler.close()

    def _record_failure(self, exc: BaseException) -> None:
        """The error that ended a run that trained goes into its log file too (the console has it already)."""
        if not is_main_process():
            return
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        stamp = time.strftime("%m/%d %H:%M:%S")
        with open(self.log_dir / f"{self.timestamp}.log", "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} - lmtune - ERROR - the run stopped at iteration {self.completed_iters}: {what}\n")

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Runner:
        return cls(cfg, **kwargs)

    def _new_log_dir(self) -> tuple[str, Path]:
        """A fresh ``<work_dir>/<timestamp>`` for this run's logs; never shared with an earlier run.

        Rank 0 creates it and tells the other ranks its name."""
        name = None
        if is_main_process():
            stamp = time.strftime("%Y%m%d_%H%M%S")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            for n in range(1000):
                candidate = stamp if n == 0 else f"{stamp}_{n}"
                try:
                    (self.work_dir / candidate).mkdir()
                    name = candidate
                    break
                except FileExistsError:
                    continue
        name = broadcast_object(name)
        if name is None:
            raise ConfigError(f"cannot create a log directory in {self.work_dir}")
        return name, self.work_dir / name

    # -- building --------------------------------------------------------
    def _choose_seed(self, seed: int | None) -> int:
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                value = torch.tensor([seed], dtype=torch.int64, device=self.device)
                torch.distributed.broadcast(value, src=0)
                seed = int(value)
        return int(seed)

    def _precompute_reference(self, model: Any, cfg: Config, train_loader_cfg: Any, val_loader_cfg: Any) -> None:
        """DPO's ``precompute_ref_log_probs``: the reference log-probabilities of the training sequences (and of
        the validation split's), from lmtune's cache when the same reference and data made them before (a
        resumed run, a second run), else computed now with the model as built, which is the reference
        (checkpoint weights are loaded after)."""
        from lmtune.dataset import cache

        model_cfg = dict(cfg.get("model") or {})
        table: dict = {}
        parts = [("training", self.train_dataloader, dict(train_loader_cfg or {}))]
        if self.val_dataloader is not None:
            parts.append(("validation", self.val_dataloader, dict(val_loader_cfg or {})))
        for what, loader, loader_cfg in parts:
            key = cache.cache_key(kind="reference log-probs 1",
                                  reference=model_cfg.get("ref_llm") or model_cfg.get("llm"),
                                  lora=model_cfg.get("lora") is not None, dataset=loader_cfg.get("dataset"),
                                  collate=loader_cfg.get("collate_fn"))
            count, loaded = model.precompute_reference(loader, self.device,
                                                       cache_file=cache.cache_root() / f"{key}.reference.pt")
            table.update(model.reference_table)
            self.logger.info(f"Reference log-probabilities of {count:,} {what} sequences "
                             + ("loaded from the cache" if loaded else "computed")
                             + " (precompute_ref_log_probs=True): no reference model is resident during training")
        model.reference_table = table

    def _build_model(self, cfg: Any) -> torch.nn.Module:
        if cfg is None:
            raise ConfigError("the config has no model")
        model = build(cfg, key="model")
        self.strategy.place_model(model)
        if not self.strategy.shards_at_load:
            self._check_packing(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.logger.info(f"Model: {trainable:,} trainable of {total:,} parameters "
                         f"({100 * trainable / max(total, 1):.2f}%)")
        return model

    def _check_packing(self, model) -> None:
        """Packed rows are only exact if the model keeps their samples apart: check once, before training."""
        dataset = self.train_dataloader.dataset
        if "num_tokens" not in getattr(dataset, "column_names", []) or not hasattr(model, "packing_leak"):
            return
        leak = model.packing_leak()
        if leak > PACKING_LEAK_TOLERANCE:
            raise ConfigError(
                f"{type(model.llm).__name__} does not keep packed samples apart (a packed sample's logits change "
                f"by {leak:.1%} when another precedes it): its attention ignores the restarting position ids. "
                "Set pack_to_max_length=False, or use a model implementation from transformers itself "
                "(trust_remote_code=False).")

    # -- state -----------------------------------------------------------
    @property
    def iter(self) -> int:
        return self.train_loop.iter

    @property
    def epoch(self) -> int:
        return self.train_loop.epoch

    @property
    def max_iters(self) -> int:
        return self.train_loop.max_iters

    @property
    def max_epochs(self) -> int:
        return self.train_loop.max_epochs

    @property
    def completed_iters(self) -> int:
        return self.train_loop.completed_iters

    @property
    def at_step_boundary(self) -> bool:
        return self.train_loop.at_step_boundary

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def call_hook(self, name: str, **kwargs: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, **kwargs)

    # -- validation --------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """One pass of the validation loop (every rank); its metrics go to the hooks (``after_val_epoch``)."""
        self.call_hook("before_val_epoch")
        metrics = self.val_loop.run()
        self.message_hub.update("val_time", self.val_loop.last_seconds)  # for the log line; read once
        self.report_metrics(metrics)
        return metrics

    def report_metrics(self, metrics: dict[str, float]) -> None:
        """Evaluation scalars (validation, answer metrics): logged, tracked, and seen by save_best and early
        stopping, through ``after_val_epoch``."""
        if metrics:
            self.call_hook("after_val_epoch", metrics=metrics)

    def stop_training(self, reason: str) -> None:
        """End the run after the current optimizer step (early stopping)."""
        self.train_loop.stop(reason)

    # -- checkpoints (the Checkpointer owns them) -------------------------
    def save_checkpoint(self, out_dir: str | None = None, save_optimizer: bool = True) -> Path | None:
        """Write ``iter_N`` now (every rank calls it); its path on rank 0. See ``Checkpointer.save``."""
        return self.checkpointer.save(out_dir, save_optimizer)

    def load_checkpoint(self, path: str | Path, resume: bool = True) -> None:
        """Load weights (``resume=False``) or the whole training state of a built runner."""
        self.checkpointer.load(path, resume)

    @property
    def run_id(self) -> str:
        return self.checkpointer.run_id

    @property
    def last_saved_iter(self) -> int | None:
        return self.checkpointer.last_saved_iter

    @property
    def last_saved_path(self) -> Path | None:
        return self.checkpointer.last_saved_path

    # -- running ---------------------------------------------------------
    def _stopped(self) -> RunStopped:
        """Save the run where it stopped (every rank takes part) and say so."""
        from lmtune.engine.checkpoint.hook import CheckpointHook

        hook = next((h for h in self.hooks if isinstance(h, CheckpointHook)), None)
        if hook is not None:
            hook.save_now(self)
        elif self.last_saved_iter != self.completed_iters:
            self.save_checkpoint()
        saved = None
        if self.last_saved_iter == self.completed_iters:  # just saved, or stopped right where it resumed
            saved = self.last_saved_path or self.resume_from
        stopped = RunStopped(self.stop_requests.requested or "a signal", self.completed_iters, saved, self.work_dir)
        self.logger.warning(str(stopped))
        return stopped

    def train(self) -> torch.nn.Module:
        """Run the loop to its end; on SIGTERM or a first Ctrl-C, save and raise ``RunStopped``."""
        start = self.completed_iters
        try:
            with self.stop_requests:
                self.call_hook("before_run")
                self.model.train()
                try:
                    model = self.train_loop.run()
                except StopTraining:
                    raise self._stopped() from None
                self.call_hook("after_run")
        except BaseException as exc:
            self._release_locks()
            if self.completed_iters == start and self.last_saved_path is None:
                self._discard_log_dir()
            else:
                self._record_failure(exc)
            raise
        finally:
            self._release_locks()
            if self.visualizer is not None:
                self.visualizer.close()
        return model



