"""How the model is spread over processes: one process, DDP, FSDP2 or DeepSpeed ZeRO.

A strategy is chosen by the launch command, not the config (``--deepspeed NAME``,
``--strategy fsdp2``, or several processes for DDP); ``strategy=dict(type='fsdp2')``
in a config works too. The runner asks the strategy to

- ``wrap_model`` before the optimizer exists (DDP, FSDP2 sharding);
- ``prepare`` the model and optimizer wrapper together (DeepSpeed's engine);
- open each micro-batch with ``micro_batch`` (no gradient sync before the last one);
- gather the trainable weights and the optimizer state for a checkpoint, and put
  them back on resume. Every rank takes part in gathering; rank 0 writes.

Checkpoints keep one layout under every strategy: ``model.safetensors`` with the
complete trainable weights (fp32 masters where training keeps them), so resume,
``lmtune convert`` and ``load_from`` work whatever the engine was. The optimizer
state is one consolidated ``optimizer.pt`` (single process, DDP, DeepSpeed) or,
under FSDP2, one shard per rank (``optimizer.rank<R>.pt``), resumable with the
same number of processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtune.core.dist import all_reduce_sum, get_world_size, is_main_process
from lmtune.core.errors import ConfigError
from lmtune.model.compile import decoder_layers

logger = logging.getLogger("lmtune")

STRATEGIES = ("ddp", "fsdp2", "deepspeed")


class Strategy:
    """One process, or DDP when the world size is above one."""

    name = "single"
    shards_params = False  # whether a rank holds only part of the weights
    sharded_optimizer = False  # whether each rank saves its own optimizer shard

    def __init__(self, device: torch.device, find_unused_parameters: bool = False) -> None:
        self.device = device
        self.find_unused_parameters = find_unused_parameters
        self.world_size = get_world_size()
        if self.world_size > 1 and self.name == "single":
            self.name = "ddp"

    # -- building ---------------------------------------------------------
    def before_model(self, cfg: Any) -> None:
        """Called before the model is built (DeepSpeed ZeRO-3 shards weights as they load)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids,
                                       find_unused_parameters=self.find_unused_parameters)

    def prepare(self, model: nn.Module, optim_wrapper: Any, runner: Any) -> tuple[nn.Module, Any]:
        return model, optim_wrapper

    @contextlib.contextmanager
    def micro_batch(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Gradients are synchronised across ranks on the last micro-batch of a step only."""
        if last or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():
                yield

    # -- checkpoints ------------------------------------------------------
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The complete trainable weights on rank 0 (None elsewhere); every rank must call it."""
        return getattr(model, "module", model).trainable_state_dict() if is_main_process() else None

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load weights into the model before ``wrap_model``."""
        model.load_trainable_state_dict(state)

    def optimizer_state_dict(self, optim_wrapper: Any) -> dict | None:
        """What ``optimizer.pt`` holds (rank 0), or this rank's shard when ``sharded_optimizer``."""
        return optim_wrapper.state_dict() if is_main_process() or self.sharded_optimizer else None

    def load_optimizer_state_dict(self, optim_wrapper: Any, state: dict) -> None:
        optim_wrapper.load_state_dict(state)

    def count_nonfinite(self, model: nn.Module) -> tuple[int, str | None]:
        """How many trainable tensors hold NaN/inf (summed over ranks) and the first one's name."""
        bad = [name for name, p in model.named_parameters()
               if p.requires_grad and p.numel() and not bool(torch.isfinite(_local(p.detach())).all())]
        total = int(all_reduce_sum(torch.tensor(len(bad), device=self.device)))
        return total, (bad[0] if bad else None)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ------------------------------------------------------------------ FSDP2

class FSDP2Strategy(Strategy):
    """``torch.distributed.fsdp.fully_shard``: every decoder layer is one unit, the causal LM the root.

    Parameters, gradients and optimizer state are sharded over all ranks. A checkpoint
    holds the complete weights (gathered; convertible to Hugging Face) and one optimizer
    shard per rank.
    """

    name = "fsdp2"
    shards_params = True
    sharded_optimizer = True

    def __init__(self, device: torch.device, reshard_after_forward: bool = True) -> None:
        super().__init__(device)
        self.reshard_after_forward = reshard_after_forward

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "quantized", False):
            raise ConfigError("FSDP2 cannot shard a 4-bit quantized model: use DDP (leave --strategy out) or "
                              "DeepSpeed (--deepspeed deepspeed_zero2) for QLoRA")
        causal_lm = model._base_model() if hasattr(model, "_base_model") else model
        blocks = decoder_layers(causal_lm)
        if not blocks:
            raise ConfigError(f"FSDP2: cannot find the decoder layers of {type(causal_lm).__name__} "
                              "(its _no_split_modules is empty)")
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward)
        fully_shard(causal_lm, reshard_after_forward=self.reshard_after_forward)
        return model

    @contextlib.contextmanager
    def micro_batch(self, model: nn.Module, last: bool) -> Iterator[None]:
        roots = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
        for module in roots:
            module.set_requires_gradient_sync(last, recurse=False)
        try:
            yield
        finally:
            for module in roots:
                module.set_requires_gradient_sync(True, recurse=False)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main_process():
            return None
        return {name: value for name, value in full.items() if name in trainable}

    def optimizer_state_dict(self, optim_wrapper: Any) -> dict:
        state = optim_wrapper.state_dict()
        state["optimizer"] = _map_tensors(state["optimizer"], _local)
        state["world_size"] = self.world_size
        return state

    def load_optimizer_state_dict(self, optim_wrapper: Any, state: dict) -> None:
        saved = int(state.get("world_size", self.world_size))
        if saved != self.world_size:
            raise ConfigError(f"the checkpoint's optimizer state is sharded over {saved} processes; resume with "
                              f"{saved} processes (this run has {self.world_size}), or use load_from to start "
                              "from its weights")
        optimizer = optim_wrapper.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        inner = state["optimizer"]
        for index, values in inner["state"].items():
            param = params[int(index)]
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor

                for key, value in list(values.items()):
                    if torch.is_tensor(value) and value.dim() > 0:
                        values[key] = DTensor.from_local(value.to(param.device), param.device_mesh,
                                                         param.placements, shape=param.shape,
                                                         stride=param.stride())
        optim_wrapper.load_state_dict(state)


def _map_tensors(obj: Any, fn) -> Any:
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


# ------------------------------------------------------------------ DeepSpeed

class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3 (with optional CPU offload) from a JSON config.

    lmtune's config wins over the JSON for the batch size, gradient accumulation and
    clipping (see ``lmtune.engine.deepspeed_config``); the precision follows the hardware.
    Checkpoints gather the fp32 master weights and the optimizer state of every trainable
    parameter, so they resume, convert and load like any other lmtune checkpoint, also
    with another number of processes.
    """

    name = "deepspeed"

    def __init__(self, device: torch.device, config: Any, runner_cfg: Any) -> None:
        super().__init__(device)
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("--deepspeed needs DeepSpeed: pip install 'lmtune[deepspeed]' "
                              "(DS_BUILD_OPS=0 pip install deepspeed --no-build-isolation)") from None
        from lmtune.engine.deepspeed_config import resolve_deepspeed_config

        self.ds_config, self.source = resolve_deepspeed_config(config, runner_cfg, device, self.world_size)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.shards_params = self.stage == 3
        self._hf_ds_config = None
        self.engine = None
        self._pending_masters: dict[str, torch.Tensor] | None = None

    def before_model(self, cfg: Any) -> None:
        if self.stage == 3:  # from_pretrained then loads each weight straight into its shard
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.init_distributed(auto_mpi_discovery=False)  # adopts lmtune's process group
            quant = cfg.get("model", {}).get("llm", {}).get("quantization_config")
            if isinstance(quant, dict) and quant.get("load_in_4bit") and "bnb_4bit_quant_storage" not in quant:
                # ZeRO-3 shards flat tensors of one dtype: 4-bit weights are stored packed in the compute dtype
                quant["bnb_4bit_quant_storage"] = quant.get("bnb_4bit_compute_dtype") or torch.bfloat16

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, model: nn.Module, optim_wrapper: Any, runner: Any) -> tuple[nn.Module, Any]:
        import deepspeed

        from lmtune.engine.optim.deepspeed_wrapper import DeepSpeedOptimWrapper

        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optim_wrapper.optimizer,
                                                          config=self.ds_config)
        self.engine = engine
        if self._pending_masters:  # checkpoint weights in fp32, not their rounding to the training precision
            from deepspeed.utils import safe_set_full_fp32_param

            for name, param in self._trainable(engine):
                safe_set_full_fp32_param(param, self._pending_masters[name].to(self.device).flatten())
        self._pending_masters = None
        runner.logger.info(f"DeepSpeed ZeRO-{self.stage} ({self.source}): "
                           f"{_precision_name(self.ds_config)}, world size {self.world_size}")
        return engine, DeepSpeedOptimWrapper(engine, optim_wrapper)

    @contextlib.contextmanager
    def micro_batch(self, model: nn.Module, last: bool) -> Iterator[None]:
        model.set_gradient_accumulation_boundary(last)
        yield

    def _trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        module = getattr(model, "module", model)
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self._trainable(model):
            value = safe_get_full_fp32_param(param)  # collective: every rank calls it, in the same order
            if value is None:
                value = param.detach().float()
            if is_main_process():
                state[name] = value.detach().cpu().reshape(_full_shape(param))
        return state if is_main_process() else None

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        # once the engine exists the model holds the weights rounded to the training precision; `prepare`
        # makes these fp32 values the optimizer's masters
        self._pending_masters = state
        if self.stage != 3 or self.engine is not None:
            model.load_trainable_state_dict(state)
            return
        import deepspeed

        # ZeRO-3 before the engine exists: each weight is gathered, set on rank 0 and sharded again
        own = dict(model.named_parameters())
        missing = [n for n, p in own.items() if p.requires_grad and n not in state]
        if missing:
            raise ConfigError(f"checkpoint does not match the model: missing {missing[:3]}")
        for name, value in state.items():
            if name not in own:
                raise ConfigError(f"checkpoint does not match the model: unexpected {name}")
            param = own[name]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if is_main_process():
                    with torch.no_grad():
                        param.copy_(value.to(param.dtype))

    def optimizer_state_dict(self, optim_wrapper: Any) -> dict | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        keys, scalars = _optimizer_keys(optim_wrapper.base_optimizer)
        params: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in self._trainable(self.engine):
            entry = {}
            for key in keys:
                value = safe_get_full_optimizer_state(param, key)  # collective
                if value is not None and is_main_process():
                    entry[key] = value.detach().cpu().reshape(_full_shape(param))
            params[name] = entry
        if not is_main_process():
            return None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_wrapper.param_groups]
        return {"deepspeed": {"params": params, "scalars": scalars, "param_groups": groups}}

    def load_optimizer_state_dict(self, optim_wrapper: Any, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state.get("deepspeed")
        if saved is None:
            raise ConfigError("the checkpoint was not saved under DeepSpeed: its optimizer state cannot be "
                              "resumed here; use load_from to start from its weights")
        self._create_optimizer_state(optim_wrapper)
        for name, param in self._trainable(self.engine):
            if name not in saved["params"]:
                raise ConfigError(f"the checkpoint holds no optimizer state for {name}")
            for key, value in saved["params"][name].items():
                safe_set_full_optimizer_state(param, value.to(self.device).flatten(), key)
        for state_entry in optim_wrapper.base_optimizer.state.values():
            for key, value in saved["scalars"].items():
                if torch.is_tensor(state_entry.get(key)):
                    state_entry[key].fill_(value)
                else:
                    state_entry[key] = value
        for group, saved_group in zip(optim_wrapper.param_groups, saved["param_groups"]):
            group.update(saved_group)

    @staticmethod
    def _create_optimizer_state(optim_wrapper: Any) -> None:
        """Optimizers create their state at the first step; a resumed run needs it before that to fill it.

        One step with zero gradients at learning rate 0 creates it without changing a weight (what it
        does to an existing state is overwritten by the checkpoint's right after).
        """
        base = optim_wrapper.base_optimizer
        zero = optim_wrapper.optimizer
        groups = [list(group["params"]) for group in base.param_groups]
        flats = getattr(zero, "fp32_partitioned_groups_flat", None)
        if flats is not None:  # ZeRO-3 hands the optimizer its flat fp32 partitions only while it steps
            owner = getattr(zero, "sub_group_to_group_id", {})
            for index, group in enumerate(base.param_groups):
                group["params"] = [flat for sub, flat in enumerate(flats) if owner.get(sub, 0) == index]
        params = [p for group in base.param_groups for p in group["params"]]
        rates = [group["lr"] for group in base.param_groups]
        for group in base.param_groups:
            group["lr"] = 0.0
        grads = [param.grad for param in params]  # offloading keeps its gradient buffers attached
        for param in params:
            param.grad = torch.zeros_like(param)
        base.step()
        for param, grad in zip(params, grads):
            param.grad = grad
        for group, lr, own in zip(base.param_groups, rates, groups):
            group["lr"] = lr
            if flats is not None:
                group["params"] = own
        link = getattr(optim_wrapper.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 ties each weight to its slice of the state after the first step
            link()


def _full_shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", None) or param.shape


def _optimizer_keys(optimizer: torch.optim.Optimizer) -> tuple[list[str], dict[str, float]]:
    """The per-element state names (``exp_avg``...) and the scalar states (``step``) of ``optimizer``."""
    keys: list[str] = []
    scalars: dict[str, float] = {}
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                if key not in keys:
                    keys.append(key)
            elif torch.is_tensor(value) or isinstance(value, (int, float)):
                scalars[key] = float(value)
        break
    return keys, scalars


def _precision_name(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


# ------------------------------------------------------------------ choosing

def choose_strategy(cfg: Any, strategy: Any = None, deepspeed: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The engine's name (None: single process or DDP) and its options: ``--deepspeed`` / ``--strategy``
    first, then the config's ``strategy`` (a name or ``dict(type=NAME, **options)``)."""
    options: dict[str, Any] = {}
    chosen = strategy if strategy is not None else cfg.get("strategy")
    if isinstance(chosen, dict):
        options = dict(chosen)
        chosen = options.pop("type", None)
    if deepspeed is not None:
        if chosen not in (None, "deepspeed"):
            raise ConfigError(f"--deepspeed and strategy {chosen!r} exclude each other; choose one")
        chosen = "deepspeed"
        options["config"] = deepspeed
    return chosen, options


def build_strategy(cfg: Any, device: torch.device, strategy: Any = None, deepspeed: str | None = None) -> Strategy:
    """The strategy for this run (see ``choose_strategy``)."""
    chosen, options = choose_strategy(cfg, strategy, deepspeed)
    if chosen not in (None, *STRATEGIES):
        raise ConfigError(f"unknown strategy {chosen!r}; choose one of {', '.join(STRATEGIES)}")
    if chosen in ("fsdp2", "deepspeed"):
        from lmtune.engine.launch import init_single_process

        init_single_process()  # both engines need a process group, also of one process
    if chosen == "deepspeed":
        if "config" not in options:
            raise ConfigError("strategy deepspeed needs config=NAME or a JSON path (or use --deepspeed NAME)")
        return DeepSpeedStrategy(device, options.pop("config"), cfg)
    if chosen == "fsdp2" and get_world_size() == 1:
        logger.info("FSDP2 with one process: nothing to shard; training as usual")
    try:
        return (FSDP2Strategy if chosen == "fsdp2" else Strategy)(device, **options)
    except TypeError as exc:
        raise ConfigError(f"strategy options: {exc}") from None


__all__ = ["DeepSpeedStrategy", "FSDP2Strategy", "STRATEGIES", "Strategy", "build_strategy"]
