"""Where the reference specs keep the original code they use: ``benchmarks/.port_refs_cache`` (ignored by git)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / ".port_refs_cache"


def package_dir(name: str, version: str, member: str) -> Path:
    """``member`` (a directory) of the PyPI package ``name==version``, downloaded (``pip download --no-deps``)
    and its ``.py`` files unpacked once."""
    target = CACHE / f"{name}-{version}"
    if not (target / member).is_dir():
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--dest", str(wheels), f"{name}=={version}"], check=True)
            found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(found[-1]) as wheel:
            for entry in wheel.namelist():
                if entry.startswith(member + "/") and entry.endswith(".py"):
                    wheel.extract(entry, target)
    return target / member
