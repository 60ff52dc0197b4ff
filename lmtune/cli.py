"""The ``lmtune`` command."""

from __future__ import annotations

import argparse
import os
import sys

import lmtune
from lmtune.configs import CONFIG_ROOT, builtin_configs, load_config, resolve_config  # noqa: F401  (the index)
from lmtune.core.errors import ConfigError


def _train(args: argparse.Namespace) -> int:
    from lmtune.engine.strategies import launch

    cfg = _load(args, fetch_model=False)  # a broken config fails here, once, before any process starts
    if launch.wants_relaunch(args.launcher):
        return launch.relaunch(args.argv)
    launch.init_distributed(args.launcher)
    from lmtune.core.dist import is_main_process
    from lmtune.engine.runner import Runner
    from lmtune.engine.runner.stop import EXIT_STOPPED, RunStopped

    finished = False
    try:
        runner = Runner.from_config(cfg, work_dir=args.work_dir, seed=args.seed,
                                    resume=args.resume if args.resume is not None else None,
                                    strategy=args.strategy, deepspeed=args.deepspeed, overwrite=args.overwrite)
        runner.train()
        finished = True
    except RunStopped as stopped:
        finished = True  # every rank stopped at the same step and saved together
        if is_main_process():
            say(EXIT_STOPPED, f"lmtune: {stopped}. Continue with:\n  {resume_command(args.argv)}")
        else:
            say(EXIT_STOPPED, "")
        return EXIT_STOPPED
    finally:
        launch.destroy_distributed(finished)
    return 0


def resume_command(argv: list[str]) -> str:
    """The ``lmtune`` command line of ``argv`` that continues its run: ``--resume`` instead of any
    ``--resume [PATH]`` or ``--overwrite`` it had. In a worker that ``NPROC_PER_NODE=N lmtune train`` started,
    that is the user's command again (``NPROC_PER_NODE=N`` in front, without the ``--launcher pytorch`` the
    relaunch added)."""
    import shlex

    from lmtune.engine.strategies.supervise import RESULTS_ENV

    prefix = []
    if os.environ.get(RESULTS_ENV):
        if argv[-2:] == ["--launcher", "pytorch"]:
            argv = argv[:-2]
        prefix = [f"{name}={os.environ[name]}" for name in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")
                  if os.environ.get(name)]
    kept, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if token.startswith("--resume=") or token == "--overwrite":
            continue
        kept.append(token)
    return " ".join(prefix + [shlex.join(["lmtune", *kept, "--resume"])])


def _load(args: argparse.Namespace, fetch_model: bool = True):
    """The config of ``args``; ``fetch_model`` runs its ``model_resource`` download (training leaves that to
    the Runner, where rank 0 downloads and the other ranks wait)."""
    import lmtune.model.ports  # noqa: F401  (hub-code families build through their ports)
    from lmtune.config import parse_overrides

    cfg = load_config(args.config, parse_overrides(args.cfg_options))
    if fetch_model:
        from lmtune.config.model_resource import apply_model_resource

        cfg = apply_model_resource(cfg)
    return cfg


def _check_dataset(args: argparse.Namespace) -> int:
    from lmtune.tools.dataset_tools import check_dataset

    problems = check_dataset(_load(args), sys.stdout, rows_to_show=args.rows)
    return 1 if problems else 0


def _log_dataset(args: argparse.Namespace) -> int:
    from lmtune.tools.dataset_tools import log_dataset

    log_dataset(_load(args), args.show, sys.stdout, rows=args.rows)
    return 0


def _list_dataset_format(args: argparse.Namespace) -> int:
    from lmtune.tools.dataset_tools import list_dataset_formats

    list_dataset_formats(sys.stdout)
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to a config .py, or a built-in config name")
    parser.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override settings")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtune", description="Fine-tune LLMs from Python config files.")
    parser.add_argument("--version", action="version", version=f"lmtune {lmtune.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train from a config file or a built-in config name")
    train.add_argument("config", help="path to a config .py, or a built-in config name such as 'demo'")
    train.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    train.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                       help="override settings, e.g. lr=1e-4 optim_wrapper.clip_grad.max_norm=0.5")
    train.add_argument("--seed", type=int, help="random seed (overrides randomness.seed)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue the run whose checkpoints are in the work dir (from the checkpoint "
                            "last_checkpoint names, or the run's newest sound one), or from PATH")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in a work dir that holds an earlier run's checkpoints (without it "
                            "such a run is refused); same-named checkpoints are replaced, the others kept")
    train.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                       help="how the processes were started: none (NPROC_PER_NODE=N re-launches under torchrun), "
                            "pytorch (by torchrun) or slurm (by srun)")
    train.add_argument("--deepspeed", metavar="NAME|JSON",
                       help="train with DeepSpeed: a built-in config (deepspeed_zero1, deepspeed_zero2, "
                            "deepspeed_zero2_offload, deepspeed_zero3, deepspeed_zero3_offload) or a JSON path")
    train.add_argument("--strategy", choices=["ddp", "fsdp2"],
                       help="how several processes share the work: ddp (default) or fsdp2 (sharded full "
                            "fine-tuning)")
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    train.set_defaults(func=_train)

    check = sub.add_parser("check-dataset", help="show what each data stage makes of the first rows; report "
                                                 "malformed rows")
    _add_config_args(check)
    check.add_argument("--rows", type=int, default=2, help="rows to show (default 2)")
    check.set_defaults(func=_check_dataset)

    log = sub.add_parser("log-dataset", help="print the first processed training rows")
    _add_config_args(log)
    log.add_argument("--show", choices=["text", "masked_text", "input_ids", "labels", "all"], default="all")
    log.add_argument("--rows", type=int, default=1)
    log.set_defaults(func=_log_dataset)

    formats = sub.add_parser("list-dataset-format", help="list the dataset formats (map functions)")
    formats.set_defaults(func=_list_dataset_format)

    from lmtune.tools import cfg_tools, chat, check, convert, plot, score

    convert.add_parser(sub)
    chat.add_parser(sub)
    score.add_parser(sub)
    cfg_tools.add_parser(sub)  # list-cfg, copy-cfg
    check.add_parser(sub)
    plot.add_parser(sub)
    return parser


def quiet_libraries() -> None:
    """Silence what the libraries print on every run that tells a user nothing.

    - bitsandbytes announces at import that an optional CPU inference kernel from a model hub is
      missing; it is not used for training (errors from it still show).
    - DeepSpeed, imported by accelerate whenever it is installed, warns that it falls back to the CPU
      when it finds no accelerator: saying so (``DS_ACCELERATOR=cpu``, for this process and the ones it
      starts) is the same choice without the warning. A machine with an accelerator is left alone.
    - peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a warning on
      each read; the same value under its new name, so the warning is about peft's code, not the user's.
    - Progress bars of datasets, transformers and huggingface_hub are kept for terminals: in a log file
      (CI, Slurm, ``> log``) each bar is a run of carriage returns on one long line.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        accelerator = getattr(torch, "accelerator", None)
        has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        if not has_accelerator:
            os.environ["DS_ACCELERATOR"] = "cpu"
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _disable_transformers_bars()


def _disable_transformers_bars() -> None:
    """transformers reads no environment variable for its bars (weight loading): switch them off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if debug:
            raise
        return say(2, f"lmtune: error: {exc}")
    except KeyboardInterrupt:
        return say(130, "lmtune: interrupted")
    except Exception as exc:  # noqa: BLE001 - one line for the user, the trace with --debug
        if debug:
            raise
        return say(1, f"lmtune: {type(exc).__name__}: {exc}\n(run again with --debug for the full traceback)")


def say(code: int, message: str) -> int:
    """Tell the user how the command ended; a worker of ``NPROC_PER_NODE=N lmtune train`` tells its agent,
    which prints one answer for all ranks. Returns ``code``."""
    from lmtune.engine.strategies.supervise import report_result

    if not report_result(code, message) and message:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
