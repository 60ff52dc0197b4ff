#!/usr/bin/env bash
# Create .venv and install lmtune with its test, QLoRA and DeepSpeed extras.
# torch is installed first, pinned; every later pip call is constrained to that torch.
# Safe to re-run: a working .venv is reused; a stale or foreign one is replaced (scripts/replace_stale_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/replace_stale_venv.sh  # a link, a broken or a foreign .venv is not written into
[ -e .venv ] || "$PY" -m venv .venv

pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install --upgrade pip
pip_install torch==2.13.0
pip_install -c constraints.txt -e ".[dev,qlora]"
# DeepSpeed builds against the installed torch (no isolated build, no compiled ops: they are JIT-built on use)
pip_install -c constraints.txt setuptools wheel
DS_BUILD_OPS=0 pip_install -c constraints.txt --no-build-isolation "deepspeed>=0.16"
echo "lmtune installed in .venv ($(.venv/bin/lmtune --version))"
