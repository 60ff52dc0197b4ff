"""HFCheckpointHook: one run directly yields a usable Hugging Face model or adapter."""

from __future__ import annotations

from pathlib import Path

from lmtune.core.dist import is_main_process
from lmtune.core.hook import Hook


class HFCheckpointHook(Hook):
    """At the end of the run, write the trained model to ``out_dir`` (default ``<work_dir>/hf``).

    LoRA/QLoRA runs give a PEFT adapter dir, full fine-tuning a model dir with its
    tokenizer, each with the training config and ``lmtune_export.json`` (so
    ``lmtune chat`` uses the training template); the same as ``lmtune convert
    pth_to_hf`` on the last checkpoint.
    """

    priority = "VERY_LOW"

    def __init__(self, out_dir: str | None = None, fp32: bool = False, max_shard_size: str = "2GB",
                 safe_serialization: bool = True) -> None:
        self.out_dir = out_dir
        self.fp32 = fp32
        self.max_shard_size = max_shard_size
        self.safe_serialization = safe_serialization

    def after_run(self, runner) -> None:
        from lmtune.engine.checkpoint.export import export_model, pth_to_hf

        out_dir = Path(self.out_dir) if self.out_dir else runner.work_dir / "hf"
        kind = "adapter" if runner.unwrapped_model.use_lora else "model"
        options = dict(fp32=self.fp32, max_shard_size=self.max_shard_size,
                       safe_serialization=self.safe_serialization)
        if runner.strategy.shards_params or runner.strategy.name == "deepspeed":
            # the weights are sharded (or in DeepSpeed's hands): export the final checkpoint, which holds
            # them gathered; every rank helps to write it if the run did not save at its last iteration
            if runner.last_saved_iter != runner.completed_iters:
                runner.save_checkpoint(save_optimizer=False)
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # the export builds a plain model in this process, not a ZeRO-3 one
            if is_main_process():  # the checkpoint of the last iteration, wherever the checkpoint hook put it
                latest = runner.last_saved_path
                pth_to_hf(latest / "config.py", latest, out_dir, **options)
        elif is_main_process():
            export_model(runner.unwrapped_model, runner.cfg, runner.config_text, out_dir, **options)
        if is_main_process():
            runner.logger.info(f"Saved the Hugging Face {kind} to {out_dir}")
