"""ThroughputHook: tokens per second, TFLOP/s per device and MFU of every iteration."""

from __future__ import annotations

import re
import time

import torch

from lmtune.core.dist import all_reduce_sum, get_world_size, sequence_parallel_size
from lmtune.core.hook import Hook
from lmtune.engine.flops import FlopCounter, count_targets, sample_lengths

# Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s, by device name (fp32 accumulation for GeForce).
# The first pattern that matches ``torch.cuda.get_device_name()`` wins.
GPU_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100", 989.0),  # SXM
    (r"A100", 312.0),
    (r"\bA10\b", 125.0),
    (r"L40S", 362.0),
    (r"RTX 4090", 165.2),
    (r"RTX 3090", 71.0),
    (r"V100.*PCIE", 112.0),  # fp16 (no bf16 on V100)
    (r"V100", 125.0),
]

# the keys this hook writes to ``runner.message_hub`` and into the iteration's ``outputs``
KEYS = ("tokens_per_sec", "tokens_per_sec_per_device", "target_tokens_per_sec", "tflops", "mfu")


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16/fp16 peak of a GPU from its name, or None if it is not in ``GPU_PEAK_TFLOPS``."""
    for pattern, peak in GPU_PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          size: int = 1024, repeats: int = 3) -> float:
    """TFLOP/s of the fastest of ``repeats`` ``size``-cubed matmuls in ``dtype`` (after one warm-up)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e12


def training_dtype(runner) -> torch.dtype:
    """The dtype the model's matmuls run in: autocast's, DeepSpeed's, or that of the weights."""
    wrapper = runner.optim_wrapper
    dtype = getattr(wrapper, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    engine = getattr(wrapper, "engine", None)
    if engine is not None:
        if getattr(engine, "bfloat16_enabled", lambda: False)():
            return torch.bfloat16
        if getattr(engine, "fp16_enabled", lambda: False)():
            return torch.float16
    for module in runner.unwrapped_model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(weight) and weight.is_floating_point():
            return weight.dtype
    return torch.float32


class ThroughputHook(Hook):
    """After every iteration: non-pad tokens/s, TFLOP/s per device and MFU.

    Written to ``runner.message_hub`` and into the iteration's ``outputs`` (hooks after this one,
    LoggerHook among them, see them), under these keys:

    ``tokens_per_sec``
        input tokens that are not padding, of all ranks, per second (prompt tokens included;
        what the model processes);
    ``tokens_per_sec_per_device``
        the same divided by the number of ranks (XTuner's ``tokens_per_sec``);
    ``target_tokens_per_sec``
        tokens that carry a loss (have a label), of all ranks, per second;
    ``tflops``
        TFLOP/s per device: the FLOPs of the iteration's forward and backward passes
        (``lmtune.engine.flops``: from the model's own modules, the real sample lengths of
        packed rows, LoRA's frozen weights, activation checkpointing's recompute), averaged
        over the ranks;
    ``mfu``
        ``tflops / peak_tflops`` (only when a peak is known).

    The time is the iteration time ``IterTimerHook`` measured (``time`` in the message hub),
    or this hook's own clock when there is none. ``peak_tflops``: the device's peak; by default
    a table of GPUs by name (dense bf16/fp16; ``GPU_PEAK_TFLOPS``) or, on a CPU, the speed of a
    1024-cubed matmul in the training dtype measured once before training.

    XTuner's arguments are accepted: ``use_activation_checkpointing`` and ``is_casual`` (causal
    attention) force what is otherwise read from the model; ``hidden_size``, ``num_layers``,
    ``vocab_size`` and ``mlp_ratio`` are not needed (the FLOPs are counted from the model's
    modules) and are ignored.
    """

    priority = 55  # after IterTimerHook (NORMAL, 50) has the iteration time, before LoggerHook (BELOW_NORMAL, 60)

    def __init__(self, use_activation_checkpointing: bool | None = None, hidden_size: int | None = None,
                 num_layers: int | None = None, vocab_size: int | None = None, mlp_ratio: float | None = None,
                 is_casual: bool | None = None, peak_tflops: float | None = None,
                 is_causal: bool | None = None) -> None:
        if peak_tflops is not None and (isinstance(peak_tflops, bool) or not isinstance(peak_tflops, (int, float))
                                        or peak_tflops <= 0):
            from lmtune.core.errors import ConfigError

            raise ConfigError(f"ThroughputHook: peak_tflops must be a positive number, got {peak_tflops!r}")
        self.use_activation_checkpointing = use_activation_checkpointing
        self.is_causal = is_causal if is_causal is not None else is_casual
        self.ignored = {name: value for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers),
                                                        ("vocab_size", vocab_size), ("mlp_ratio", mlp_ratio))
                        if value is not None}
        self.peak_tflops = None if peak_tflops is None else float(peak_tflops)
        self.peak_source = "peak_tflops" if peak_tflops is not None else None
        self.counter: FlopCounter | None = None
        self.last: dict[str, float] = {}
        self._clock: float | None = None

    def before_train(self, runner) -> None:
        model = runner.unwrapped_model
        self.counter = FlopCounter(model, causal=self.is_causal,
                                   activation_checkpointing=self.use_activation_checkpointing)
        if self.ignored:
            runner.logger.info(f"ThroughputHook: {', '.join(self.ignored)} ignored: FLOPs are counted from the "
                               "model's own modules")
        if self.peak_tflops is None:
            self.peak_tflops, self.peak_source = self._find_peak(runner)
        peak = f"{self.peak_tflops:.1f} TFLOP/s ({self.peak_source})" if self.peak_tflops else "unknown (no MFU)"
        runner.logger.info(f"ThroughputHook: {self.counter.describe()}; peak {peak}")
        self._clock = time.perf_counter()

    def _find_peak(self, runner) -> tuple[float | None, str | None]:
        device = torch.device(runner.device)
        dtype = training_dtype(runner)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = gpu_peak_tflops(name)
            if peak is None:
                runner.logger.warning(f"ThroughputHook: no peak FLOP/s known for {name!r}; MFU is not reported. "
                                      "Pass peak_tflops=... (dense bf16/fp16 TFLOP/s of one device).")
                return None, None
            if dtype == torch.float32:
                runner.logger.warning("ThroughputHook: training in float32, MFU is against the bf16/fp16 peak; "
                                      "pass peak_tflops=... for the fp32/TF32 one")
            return peak, f"{name}, dense bf16/fp16"
        if device.type == "cpu":
            return measure_matmul_tflops(dtype, device), f"measured {str(dtype).removeprefix('torch.')} matmul"
        return None, None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        now = time.perf_counter()
        own_time, self._clock = now - (self._clock or now), now
        if self.counter is None or not isinstance(data_batch, dict) or "input_ids" not in data_batch:
            return
        elapsed = runner.message_hub.get("time")
        elapsed = float(elapsed) if elapsed else own_time
        lengths = sample_lengths(data_batch)
        targets = count_targets(data_batch) if "labels" in data_batch else None
        flops = self.counter.step_flops(lengths, targets)
        # the ranks of a sequence-parallel group hold the same rows (a slice each): each counts its share of them
        share = 1.0 / sequence_parallel_size()
        local = torch.tensor([float(sum(lengths)) * share, float(targets or 0) * share, flops * share],
                             dtype=torch.float64, device=runner.device)
        tokens, target_tokens, total_flops = all_reduce_sum(local).tolist()  # one collective for all three
        world = get_world_size()
        elapsed = max(elapsed, 1e-12)
        values = {"tokens_per_sec": tokens / elapsed,
                  "tokens_per_sec_per_device": tokens / world / elapsed,
                  "target_tokens_per_sec": target_tokens / elapsed,
                  "tflops": total_flops / world / elapsed / 1e12}
        if self.peak_tflops:
            values["mfu"] = values["tflops"] / self.peak_tflops
        self.last = {**values, "time": elapsed, "tokens": tokens, "target_tokens": target_tokens,
                     "flops": total_flops}
        for key, value in values.items():
            runner.message_hub.update(key, value)
        if isinstance(outputs, dict):
            outputs.update(values)
