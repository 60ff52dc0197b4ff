"""Run by setup_xtuner_env.sh with the XTuner environment's python: does xtuner.dataset import (with
and without benchmarks/xtuner_stubs on PYTHONPATH), and which versions were installed."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "xtuner_stubs"
CODE = "from xtuner.dataset import process_hf_dataset; from xtuner.dataset.map_fns import alpaca_map_fn"


def try_import(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env)


def main() -> int:
    plain = try_import()
    if plain.returncode == 0:
        print("xtuner.dataset imports without the stubs")
    else:
        last = (plain.stderr.strip().splitlines() or ["?"])[-1]
        print(f"xtuner.dataset does not import as installed ({last})")
        stubbed = try_import(STUBS)
        if stubbed.returncode != 0:
            print("nor with benchmarks/xtuner_stubs on PYTHONPATH:\n" + stubbed.stderr[-3000:])
            return 1
        print("xtuner.dataset imports with benchmarks/xtuner_stubs on PYTHONPATH (as the benchmark runs it)")
    for name in ("xtuner", "torch", "torchvision", "transformers", "tokenizers", "datasets", "mmengine", "numpy"):
        try:
            print(f"  {name}=={version(name)}")
        except PackageNotFoundError:
            print(f"  {name}: not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
