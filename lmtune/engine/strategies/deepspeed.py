"""DeepSpeed ZeRO 1/2/3, with optional CPU offload, from a JSON config (see ``deepspeed_config``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtune.core.dist import is_main_process, is_sharded
from lmtune.core.errors import ConfigError
from lmtune.engine.optim.optimizer_wrapper import StepSettings
from lmtune.engine.strategies.base import Strategy

logger = logging.getLogger("lmtune")


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3 (with optional CPU offload) from a JSON config.

    lmtune's config wins over the JSON for the batch size, gradient accumulation and
    clipping (see ``lmtune.engine.strategies.deepspeed_config``); the precision follows the hardware.
    Checkpoints gather the fp32 master weights and the optimizer state of every trainable
    parameter, so they resume, convert and load like any other lmtune checkpoint, also
    with another number of processes.
    """

    name = "deepspeed"

    def __init__(self, device: torch.device, config: Any) -> None:
        super().__init__(device)
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("--deepspeed needs DeepSpeed: pip install 'lmtune[deepspeed]' "
                              "(DS_BUILD_OPS=0 pip install deepspeed --no-build-isolation)") from None
        if device.type == "cpu":
            # DeepSpeed's CPU backend compiles a shared-memory all-reduce (C++, at the first run, in every
            # rank, needing a compiler) that only its inference path uses: training's collectives go
            # through torch.distributed either way, so lmtune skips the build
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        from lmtune.engine.strategies.deepspeed_config import load_deepspeed_json, zero_stage

        self.raw_config, self.source = load_deepspeed_json(config)
        self.stage = zero_stage(self.raw_config, self.source)
        self.shards_params = self.shards_at_load = self.stage == 3
        self.ds_config: dict | None = None  # filled in by configure()
        self._hf_ds_config = None
        self.engine = None
        self._pending_masters: dict[str, torch.Tensor] | None = None

    def configure(self, micro_batch_size: int, step: StepSettings) -> None:
        from lmtune.engine.strategies.deepspeed_config import resolve_deepspeed_config

        self.ds_config = resolve_deepspeed_config(self.raw_config, self.source, micro_batch_size, step,
                                                  self.device, self.world_size)
        if self.stage == 3:  # from_pretrained then loads each weight straight into its shard
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.init_distributed(auto_mpi_discovery=False)  # adopts lmtune's process group
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def model_config(self, model_cfg: Any) -> Any:
        """Under ZeRO-3, 4-bit weights are stored packed in the compute dtype (ZeRO-3 shards flat tensors of
        one dtype): a copy of the model config says so where the user's does not."""
        llm = model_cfg.get("llm") if isinstance(model_cfg, dict) else None
        quant = llm.get("quantization_config") if isinstance(llm, dict) else None
        if (self.stage != 3 or not isinstance(quant, dict) or not quant.get("load_in_4bit")
                or "bnb_4bit_quant_storage" in quant):
            return model_cfg
        storage = quant.get("bnb_4bit_compute_dtype") or torch.bfloat16
        logger.info(f"ZeRO-3: 4-bit weights are stored as {storage} (quantization_config.bnb_4bit_quant_storage)")
        return {**model_cfg, "llm": {**llm, "quantization_config": {**quant, "bnb_4bit_quant_storage": storage}}}

    def place_model(self, model: nn.Module) -> None:
        if self.stage != 3:
            super().place_model(model)
            return
        params = list(model.parameters())
        logger.info(f"ZeRO-3: {sum(is_sharded(p) for p in params)} of {len(params)} weights were sharded as they "
                    "loaded (packing check skipped: it needs the whole model)")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, model: nn.Module, optim_wrapper: Any, runner: Any) -> tuple[nn.Module, Any]:
        import deepspeed

        from lmtune.engine.strategies.deepspeed_wrapper import DeepSpeedOptimWrapper

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


__all__ = ["DeepSpeedStrategy"]
