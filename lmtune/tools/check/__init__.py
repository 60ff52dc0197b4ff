"""``lmtune check CONFIG``: a dry run of a config before it spends GPU hours.

It builds the tokenizer and the first rows of the dataset (``--rows``, default 200: the raw
dataset is loaded, cut to its first rows, and only those are tokenized and packed), renders one
sample with its trained part marked, counts the model's parameters without loading a weight (the
model is built from its config on the meta device and LoRA is applied there), estimates the memory
each device needs and the number of optimizer steps, and flags settings that cannot work. The
report goes to stdout; the exit status is 1 when there are problems, else 0. A config's
``model_resource`` is fetched first (see :mod:`lmtune.config.model_resource`), as training would.

The parts: ``model`` (the model on the meta device), ``memory`` (the engine and the memory model),
``data`` (tokenizer, template and data checks), ``report`` (the report and its writer).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any, TextIO

from lmtune.config.build import build
from lmtune.core.errors import ConfigError
from lmtune.engine.optim.optimizer_wrapper import StepSettings
from lmtune.engine.runner.loops import optimizer_steps, run_length
from lmtune.model.build import FLASH_ATTENTION
from lmtune.tools.check.data import _check_template, _data, _tokenizer_cfg
from lmtune.tools.check.memory import GIB, _optimizer_states, estimate_memory, human_bytes, resolve_engine
from lmtune.tools.check.model import ModelFacts, _model_cfg, _weight_bytes, build_meta_model
from lmtune.tools.check.report import CheckReport, Writer, _clip
from lmtune.tools.check.validation import check_validation

DEFAULT_ROWS = 200


@contextlib.contextmanager
def _quiet():
    """No progress bars from datasets and no deprecation chatter from the libraries in the report."""
    import warnings

    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def check_config(cfg: Any, out: TextIO, nproc: int = 1, deepspeed: str | None = None, strategy: str | None = None,
                 rows: int = DEFAULT_ROWS, gpu_memory_gib: float | None = None) -> CheckReport:
    """Run every check on ``cfg`` (a loaded Config), writing the report to ``out``."""
    with _quiet():
        return _check_config(cfg, out, nproc, deepspeed, strategy, rows, gpu_memory_gib)


def _check_config(cfg: Any, out: TextIO, nproc: int, deepspeed: str | None, strategy: str | None, rows: int,
                  gpu_memory_gib: float | None) -> CheckReport:
    from lmtune.config.model_resource import apply_model_resource
    from lmtune.tools.dataset_tools import dataset_configs

    cfg = apply_model_resource(cfg)
    report = CheckReport()
    w = Writer(out)
    sp, nproc, sp_note = sequence_parallel_plan(cfg.get("sequence_parallel_size"), nproc)
    engine = report.engine = resolve_engine(cfg, nproc, deepspeed, strategy)
    w.line(f"lmtune check: {getattr(cfg, 'filename', 'config')}")
    w.line(f"engine: {engine.name}" + (f" over {engine.nproc} devices" if engine.nproc > 1 else "")
           + (f"; sequence parallelism: each row split over {sp} devices, {nproc // sp} data-parallel group(s)"
              if sp > 1 else ""))
    if sp_note:
        report.notes.append(sp_note)

    model_cfg = _model_cfg(cfg)
    ds_cfgs = dataset_configs(cfg)
    loader = dict(cfg.get("train_dataloader") or {})
    batch = int(loader.get("batch_size", 1) or 1)
    step = StepSettings.from_config(cfg.get("optim_wrapper"))
    accum = step.accumulative_counts
    max_length = next((int(d["max_length"]) for d in ds_cfgs if d.get("max_length")), None)

    # -- tokenizer
    w.section("tokenizer")
    tok_cfg = _tokenizer_cfg(cfg, ds_cfgs)
    if tok_cfg is None:
        raise ConfigError("the config names no tokenizer (tokenizer=dict(...) or train_dataset.tokenizer)")
    tokenizer = build(tok_cfg, key="tokenizer")
    specials = ", ".join(f"{k} {getattr(tokenizer, k)!r}" for k in ("bos_token", "eos_token", "pad_token")
                         if getattr(tokenizer, k, None) is not None)
    w.line(f"{type(tokenizer).__name__} from {getattr(tokenizer, 'name_or_path', '?')}: {len(tokenizer):,} tokens"
           + (f"; {specials}" if specials else ""))
    if getattr(tokenizer, "eos_token", None) is None:
        report.notes.append("the tokenizer has no EOS token: unless the template ends each answer with its own "
                            "end marker, the model does not learn where to stop")
    _check_template(report, w, cfg, ds_cfgs, tokenizer)

    # -- model (before the data: the data check compares token ids with the embedding table)
    facts: ModelFacts | None = None
    try:
        facts = report.model = build_meta_model(cfg, tokenizer)
    except ConfigError as exc:
        report.problems.append(str(exc))

    # -- data
    w.section(f"data (first {rows:,} rows of each dataset)")
    est_rows, exact = _data(report, w, ds_cfgs, tokenizer, rows, facts.vocab if facts else None)
    if report.sample_text is not None:
        w.line("[sample 0, input]")
        w.line(_clip(report.sample_text))
        w.line("[sample 0, trained part; [masked: N tokens] = not trained]")
        w.line(_clip(report.sample_trained or ""))

    # -- model report
    w.section("model")
    use_varlen = bool(model_cfg.get("use_varlen_attn", False))
    if facts is not None:
        w.line(f"{facts.name}: {facts.layers} layers, hidden {facts.hidden}, {facts.heads} heads "
               f"(key/value width {facts.kv_dim}), MLP {facts.intermediate}, vocab {facts.vocab:,}, max positions "
               f"{facts.max_positions}, attention {facts.attn_implementation}")
        if facts.implementation:
            w.line(f"runs on: {facts.implementation}")
        share = 100 * facts.trainable_params / max(facts.total_params, 1)
        w.line(f"parameters: {facts.total_params:,} total, {facts.trainable_params:,} trainable ({share:.2f}%)")
        if facts.lora_targets:
            w.line(f"LoRA on: {', '.join(facts.lora_targets)}")
        if facts.quant_bits:
            w.line(f"quantized: {facts.quantized_params:,} linear weights in {facts.quant_bits} bits"
                   + (" (double quantization)" if facts.double_quant else ""))
            if model_cfg.get("lora") is None and model_cfg.get("peft_model") is None:
                report.problems.append("the model is quantized but has no lora=dict(...): quantized weights cannot "
                                       "be trained; add LoRA (QLoRA) or set model.llm.quantization_config=None")
        if max_length and facts.max_positions and max_length > int(facts.max_positions):
            report.problems.append(f"max_length={max_length} is above the model's max_position_embeddings="
                                   f"{facts.max_positions}: positions past it were never trained (or do not exist); "
                                   "lower max_length")
        if len(tokenizer) > facts.vocab:
            report.problems.append(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding table only "
                                   f"{facts.vocab:,}: ids past it crash the training; pass tokenizer=... to the "
                                   "model so that it resizes its embeddings")
    objective = preference_objective(model_cfg)
    if objective:
        w.line(objective[0])
    if sp > 1:
        attn = dict(model_cfg.get("llm") or {}).get("attn_implementation")
        if objective:
            report.problems.append(f"sequence_parallel_size={sp}: lmtune splits sequences for supervised "
                                   "fine-tuning (SupervisedFinetune) only; set sequence_parallel_size=1")
        elif attn not in (None, "sdpa", *FLASH_ATTENTION):  # flash-attn's are replaced by the packed SDPA
            report.problems.append(f"sequence_parallel_size={sp} runs the attention on lmtune's packed SDPA; this "
                                   f"model sets attn_implementation={attn!r}: drop it (or set 'sdpa')")
    if use_varlen and batch > 1:
        report.problems.append(f"use_varlen_attn=True needs train_dataloader.batch_size=1 (it is {batch}): the "
                               "variable-length attention arguments describe one packed row")
    collate = loader.get("collate_fn")
    if isinstance(collate, dict) and "use_varlen_attn" in collate and bool(collate["use_varlen_attn"]) != use_varlen:
        report.problems.append(f"model.use_varlen_attn={use_varlen} but train_dataloader.collate_fn.use_varlen_attn="
                               f"{collate['use_varlen_attn']}: set both from one use_varlen_attn setting")

    # -- memory
    checkpointing = bool(model_cfg.get("use_activation_checkpointing", True))
    if facts is not None and max_length:
        states, state_bytes, opt_name = _optimizer_states(cfg)
        mixed = step.mixed_precision
        rows_of, tokens_of = batch, max_length
        pairs_cfg = next((d for d in ds_cfgs if _is_preference_data(d)), None)
        if pairs_cfg is not None:  # a pair is two sequences; packed rows hold max_packed_length tokens
            if pairs_cfg.get("use_varlen_attn"):
                tokens_of = int(pairs_cfg.get("max_packed_length", 16384))
            else:
                rows_of = 2 * batch
        # sequence parallelism: each device holds 1/sp of every row (padded to a multiple of sp)
        device_tokens = -(-tokens_of // sp)
        mem = report.memory = estimate_memory(
            facts, engine, rows_of, device_tokens, mixed_precision=mixed, weight_bytes=_weight_bytes(cfg, facts),
            optimizer_states=states, state_bytes=state_bytes, checkpointing=checkpointing)
        if objective and objective[1]:  # a resident reference model: frozen weights as loaded, sharded with ZeRO-3
            mem.reference = facts.total_params * _weight_bytes(cfg, facts) / (
                engine.nproc if engine.zero_stage >= 3 and engine.nproc > 1 else 1)
        w.section(f"memory per device (estimate; batch {rows_of} x {tokens_of} tokens"
                  + (f", each row split over {sp} devices: {device_tokens} tokens per device" if sp > 1 else "")
                  + f", {engine.name}" + (f", {engine.nproc} devices)" if engine.nproc > 1 else ")"))
        sharded = {1: "optimizer states sharded", 2: "gradients and optimizer states sharded",
                   3: "weights, gradients and optimizer states sharded"}.get(engine.zero_stage if engine.nproc > 1
                                                                           else 0)
        w.line(f"weights       {human_bytes(mem.weights):>12}"
               + (f"  ({facts.quant_bits}-bit: {mem.detail['quant_bytes_per_param']:.3f} B per quantized weight)"
                  if facts.quant_bits else ""))
        w.line(f"gradients     {human_bytes(mem.gradients):>12}")
        w.line(f"optimizer     {human_bytes(mem.optimizer):>12}  ({opt_name}: {states} state(s) per trainable "
               f"parameter" + (", fp32 master copy" if engine.deepspeed and mixed else "") + ")"
               + (" - offloaded to the CPU" if engine.offload_optimizer else ""))
        w.line(f"activations   {human_bytes(mem.activations_checkpointed):>12}  with activation checkpointing; "
               f"{human_bytes(mem.activations)} without")
        w.line(f"logits        {human_bytes(mem.logits):>12}  (upper bound)")
        if objective:
            w.line(f"reference     {human_bytes(mem.reference):>12}  ({objective[2]})")
            if mem.reference:
                w.line(f"              (without a resident reference, as with LoRA: "
                       f"{human_bytes(mem.total() - mem.reference)} in total)")
        w.line(f"total         {human_bytes(mem.total()):>12}  (activation checkpointing "
               f"{'on' if checkpointing else 'off'}, as configured); {human_bytes(mem.total(not checkpointing))} "
               f"with it {'off' if checkpointing else 'on'}")
        if sharded:
            w.line(f"({sharded} over {engine.nproc} devices)")
        if mem.cpu:
            w.line(f"host memory for offloaded state: {human_bytes(mem.cpu)} per process")
        w.line("plus the CUDA context and workspaces (about 0.5-1 GiB); formulas: lmtune/tools/check/memory.py")
        if gpu_memory_gib is not None and mem.total() > gpu_memory_gib * GIB:
            report.problems.append(f"the estimated {human_bytes(mem.total())} per device is more than the "
                                   f"{gpu_memory_gib:g} GiB given with --gpu-memory: lower batch_size or max_length, "
                                   "turn activation checkpointing on, use QLoRA or shard with --deepspeed")

    # -- validation
    world = engine.nproc // sp  # the data-parallel ranks: a sequence-parallel group reads one set of rows
    first_iters = math.ceil(math.ceil(est_rows / world) / batch) if est_rows else None
    est_rows = check_validation(report, w, cfg, ds_cfgs,
                                lambda configs: _data(report, w, configs, tokenizer, rows,
                                                      facts.vocab if facts else None, sample=False)[0],
                                checkpointing, world, est_rows, first_iters)

    # -- schedule
    w.section("schedule")
    w.line(f"{batch} row(s) per device x {accum} accumulation step(s) x {world} "
           + (f"data-parallel group(s) of {sp} devices" if sp > 1 else "device(s)")
           + f" = {batch * accum * world} rows per optimizer step")
    train_cfg = dict(cfg.get("train_cfg") or {})
    if est_rows is not None:
        rows_total = max(int(round(est_rows)), 0)
        report.rows, report.rows_exact = rows_total, exact
        iters = math.ceil(math.ceil(rows_total / world) / batch) if rows_total else 0
        report.iters_per_epoch = iters
        if iters == 0:
            report.problems.append("the dataset gives no training rows")
        else:
            steps_per_epoch = optimizer_steps(iters, iters, accum)
            max_iters = train_cfg.get("max_iters")
            max_epochs = None if max_iters is not None else train_cfg.get("max_epochs", 1)
            epochs, total_iters = run_length(iters, max_epochs, max_iters)
            epochs_text = f"max_iters={total_iters}" if max_iters is not None else f"{epochs} epoch(s)"
            steps = optimizer_steps(total_iters, iters, accum)
            report.optimizer_steps = steps
            approx = "" if exact else "~"
            w.line(f"training rows: {approx}{rows_total:,}" + ("" if exact else " (estimated from the sampled rows)"))
            w.line(f"iterations per epoch: {approx}{iters:,}; optimizer steps per epoch: {approx}{steps_per_epoch:,}")
            w.line(f"{epochs_text}: {approx}{total_iters:,} iterations, {approx}{steps:,} optimizer steps")
            for key in ("save_steps", "evaluation_freq"):
                value = cfg.get(key)
                if isinstance(value, int) and value > total_iters:
                    report.notes.append(f"{key}={value} is more than the {approx}{total_iters:,} iterations of the "
                                        "run: it never fires before the end")
    else:
        w.line("training rows: unknown (see the notes)")

    # -- verdict
    if report.notes:
        w.section("notes")
        for note in report.notes:
            w.line(f"- {note}")
    w.section("problems" if report.problems else "result")
    for problem in report.problems:
        w.line(f"- {problem}")
    w.line(f"{len(report.problems)} problem(s)" if report.problems else "OK: no problems found")
    return report


def sequence_parallel_plan(size: Any, nproc: int) -> tuple[int, int, str | None]:
    """(sequence-parallel size, number of devices, a note or None): a config that splits its rows over more
    devices than ``--nproc`` gives is checked on the fewest devices it runs on."""
    size = 1 if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"sequence_parallel_size must be a positive integer, got {size!r}")
    if nproc % size == 0:
        return size, nproc, None
    if nproc == 1:
        return size, size, (f"sequence_parallel_size={size} splits each row over {size} devices: checked on {size} "
                            f"devices (--nproc N, a multiple of {size}, checks another number)")
    raise ConfigError(f"sequence_parallel_size={size} needs a number of devices that it divides; --nproc {nproc} "
                      "is not one")


def _is_preference_data(ds_cfg: dict) -> bool:
    from lmtune.dataset.preference import build_preference_dataset

    kind = ds_cfg.get("type")
    return kind is build_preference_dataset or str(kind).endswith("build_preference_dataset")


def preference_objective(model_cfg: dict) -> tuple[str, bool, str] | None:
    """For preference and reward models: (a line naming the objective, whether a reference model is resident, what
    the reference is); None for supervised fine-tuning."""
    from lmtune.model.preference import DPO, PreferenceModel
    from lmtune.model.reward import RewardModel

    kind = model_cfg.get("type")
    if not isinstance(kind, type) or not issubclass(kind, (PreferenceModel, RewardModel)):
        return None
    lora = model_cfg.get("lora") is not None or model_cfg.get("peft_model") is not None
    if issubclass(kind, RewardModel):
        return (f"objective: reward model ({model_cfg.get('loss_type', 'ranking')} loss, penalty "
                f"{model_cfg.get('penalty_type', 'log_barrier')}), scored at the reward token", False,
                "none: a reward model has no reference")
    if not issubclass(kind, DPO):
        return f"objective: {kind.__name__} (beta {model_cfg.get('beta', 'default')}), no reference model", False, \
            "none: reference-free"
    if model_cfg.get("precompute_ref_log_probs"):
        ref, resident = "log-probabilities precomputed before training (precompute_ref_log_probs)", False
    elif model_cfg.get("ref_llm") is not None:
        ref, resident = "ref_llm, a frozen model of its own", True
    elif lora:
        ref, resident = "the base model with the adapters disabled: no second copy", False
    else:
        ref, resident = "a frozen copy of the model as it starts", True
    line = (f"objective: DPO ({model_cfg.get('loss_type', 'sigmoid')} loss, beta {model_cfg.get('beta', 0.1)}); "
            f"reference: {ref}")
    return line, resident, ref + ("" if resident else "; 0 resident")


def run_check(cfg: Any, out: TextIO, nproc: int = 1, deepspeed: str | None = None, **kwargs: Any) -> list[str]:
    """Check ``cfg`` and write the report to ``out``; the problems found (empty when it looks fine)."""
    return check_config(cfg, out, nproc=nproc, deepspeed=deepspeed, **kwargs).problems


# ------------------------------------------------------------------ command line

def _check_cmd(args: argparse.Namespace) -> int:
    from lmtune.config import parse_overrides
    from lmtune.configs import load_config

    cfg = load_config(args.config, parse_overrides(args.cfg_options))
    problems = run_check(cfg, sys.stdout, nproc=args.nproc, deepspeed=args.deepspeed, strategy=args.strategy,
                         rows=args.rows, gpu_memory_gib=args.gpu_memory)
    return 1 if problems else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``check`` on ``subparsers``."""
    check = subparsers.add_parser(
        "check", help="dry run: tokenizer, a sample, parameter counts, memory and step estimates, problems")
    check.add_argument("config", help="path to a config .py, or a built-in config name")
    check.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override settings")
    check.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="number of devices the run will use (default 1)")
    check.add_argument("--deepspeed", metavar="NAME|JSON",
                       help="estimate for DeepSpeed: a built-in config (deepspeed_zero1 ... deepspeed_zero3_offload) "
                            "or a JSON path")
    check.add_argument("--strategy", choices=["ddp", "fsdp2"], help="estimate for ddp (default) or fsdp2")
    check.add_argument("--rows", type=_positive_int, default=DEFAULT_ROWS,
                       help=f"rows of each dataset to tokenize and pack (default {DEFAULT_ROWS})")
    check.add_argument("--gpu-memory", type=float, metavar="GiB",
                       help="memory of one device: a problem is reported when the estimate is above it")
    check.add_argument("--debug", action="store_true", help="show full tracebacks")
    check.set_defaults(func=_check_cmd)
    return check
