"""``lmtune plot``: a run's curves as a PNG (drawn by lmtune.engine.logging.curves)."""

from __future__ import annotations

import argparse
from typing import Any

from lmtune.engine.logging.curves import CURVES_FILE, plot_run

# ------------------------------------------------------------------ command line

def _plot_cmd(args: argparse.Namespace) -> int:
    png, rows, dirs = plot_run(args.path, args.out)
    print(f"Wrote {png} ({len(rows)} logged iterations, {rows[0]['iter']}..{rows[-1]['iter']}, from "
          f"{len(dirs)} log dir{'s' if len(dirs) > 1 else ''})")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plot`` on ``subparsers``."""
    plot = subparsers.add_parser("plot", help="draw loss, lr, grad norm and throughput curves of a run as a PNG")
    plot.add_argument("path", metavar="WORK_DIR_OR_LOG_DIR",
                      help="a work dir (its newest run, resumed parts joined) or one of its log dirs")
    plot.add_argument("--out", metavar="FILE", help=f"the PNG to write (default: <newest log dir>/{CURVES_FILE})")
    plot.add_argument("--debug", action="store_true", help="show full tracebacks")
    plot.set_defaults(func=_plot_cmd)
    return plot
