"""``lmtune convert``: ``pth_to_hf`` and ``merge`` on the command line (the export: engine/checkpoint/export.py)."""

from __future__ import annotations

import argparse
from typing import Any

from lmtune.engine.checkpoint.export import merge, pth_to_hf

# ------------------------------------------------------------------ command line

def _pth_to_hf_cmd(args: argparse.Namespace) -> int:
    from lmtune.config import parse_overrides

    pth_to_hf(args.config, args.checkpoint, args.save_dir, fp32=args.fp32, max_shard_size=args.max_shard_size,
              safe_serialization=args.safe_serialization, cfg_options=parse_overrides(args.cfg_options))
    print(f"saved to {args.save_dir}")
    return 0


def _merge_cmd(args: argparse.Namespace) -> int:
    merge(args.base, args.adapter, args.save_dir, max_shard_size=args.max_shard_size, device=args.device,
          safe_serialization=args.safe_serialization, trust_remote_code=args.trust_remote_code)
    print(f"saved to {args.save_dir}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert pth_to_hf`` and ``convert merge`` on ``subparsers``."""
    convert = subparsers.add_parser("convert", help="export checkpoints to Hugging Face format; merge adapters")
    convert.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND")

    export = sub.add_parser("pth_to_hf", help="export an iter_N checkpoint as a PEFT adapter or a full model")
    export.add_argument("config", help="the training config (path or built-in name)")
    export.add_argument("checkpoint", help="checkpoint directory, e.g. work_dirs/cfg/iter_500")
    export.add_argument("save_dir", help="where the Hugging Face files go")
    export.add_argument("--fp32", action="store_true", help="save full models in float32")
    export.add_argument("--max-shard-size", default="2GB", help="largest weight shard (default 2GB)")
    export.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                        help="save .safetensors (default) or .bin")
    export.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override settings")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    export.set_defaults(func=_pth_to_hf_cmd)

    merge_p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge_p.add_argument("base", help="the unquantized base model directory or hub id")
    merge_p.add_argument("adapter", help="the adapter directory (from convert pth_to_hf)")
    merge_p.add_argument("save_dir", help="where the merged model goes")
    merge_p.add_argument("--max-shard-size", default="2GB", help="largest weight shard (default 2GB)")
    merge_p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                         help="where to load the model for merging (default cpu)")
    merge_p.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                         help="save .safetensors (default) or .bin")
    merge_p.add_argument("--trust-remote-code", action="store_const", const=True, default=None,
                         help="run the base model repository's own Python code (by default only when the "
                              "training config recorded beside the adapter said trust_remote_code=True; "
                              "the hub-code families lmtune runs natively need none)")
    merge_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    merge_p.set_defaults(func=_merge_cmd)
    convert.set_defaults(func=lambda args: (convert.print_help(), 2)[1])
    return convert
