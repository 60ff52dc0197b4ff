"""The measuring hook of benchmarks/train_speed.py, for lmtune and for XTuner (MMEngine) alike.

Both runners call ``before_train``, ``after_train_iter`` and ``after_train`` with the same arguments,
so one hook measures both sides the same way. Per optimizer step (``accumulative_counts``
iterations) it records the wall time since the previous step ended (data loading, forward, backward,
optimizer, every other hook: all of it), the real tokens (not padding) and the labelled tokens of
the step. At the end it writes ``out_file`` (JSON) with those lists, the time from the launch of the
process (``BENCH_T0`` in the environment, set by the parent) to the end of the first step, and the
peak resident memory of the process.
"""

from __future__ import annotations

import json
import os
import resource
import time

try:  # XTuner's environment
    from mmengine.hooks import Hook
except ImportError:  # lmtune's (config imports of mmengine.* are mapped to lmtune, module imports are not)
    from lmtune.engine.hooks import Hook


def alpaca_same_text_map_fn(example: dict) -> dict:
    """Alpaca rows as one turn without a system prompt, so that both sides train the very same text.

    lmtune's ``alpaca_map_fn`` gives the alpaca system prompt and XTuner 0.2.0's gives none (and keeps
    a trailing newline after an instruction without input); the benchmark config uses this instead.
    """
    if example.get("output") == "<nooutput>":
        return {"conversation": []}
    prompt = example["instruction"] + ("\n" + example["input"] if example.get("input") else "")
    return {"conversation": [{"input": prompt, "output": example["output"]}]}


def _real_tokens(data: dict, pad_token_id: int) -> tuple[int, int]:
    ids, labels = data["input_ids"], data["labels"]
    mask = data.get("attention_mask")
    if mask is not None:
        real = int(mask.sum())
    elif ids.shape[0] == 1:
        real = ids.numel()
    else:  # right padding without a mask (lmtune): drop each row's trailing run of pad ids
        real = 0
        for row in ids.tolist():
            n = len(row)
            while n and row[n - 1] == pad_token_id:
                n -= 1
            real += n
    return real, int((labels[:, 1:] >= 0).sum())


class SpeedProbe(Hook):
    priority = "VERY_LOW"  # after the optimizer step and after the other hooks of the iteration

    def __init__(self, out_file: str, accumulative_counts: int = 1, pad_token_id: int = -1) -> None:
        self.out_file = out_file
        self.accum = accumulative_counts
        self.pad_token_id = pad_token_id
        self.steps: list[dict] = []
        self.pending = [0, 0]
        self.first_step_s = None

    def before_train(self, runner) -> None:
        self._sync()
        self.last = time.perf_counter()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        data = data_batch.get("data", data_batch) if isinstance(data_batch, dict) else data_batch
        real, labelled = _real_tokens(data, self.pad_token_id)
        self.pending[0] += real
        self.pending[1] += labelled
        if (runner.iter + 1) % self.accum:
            return
        self._sync()
        now = time.perf_counter()
        self.steps.append({"seconds": now - self.last, "tokens": self.pending[0], "labelled": self.pending[1]})
        self.last = now
        self.pending = [0, 0]
        if self.first_step_s is None and os.environ.get("BENCH_T0"):
            self.first_step_s = time.time() - float(os.environ["BENCH_T0"])

    def after_train(self, runner) -> None:
        import torch

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        with open(self.out_file, "w") as f:
            json.dump({"steps": self.steps, "first_step_s": self.first_step_s, "peak_rss_mib": peak_rss,
                       "peak_gpu_mib": peak_gpu}, f)
