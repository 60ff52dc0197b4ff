#!/usr/bin/env bash
# Create .venv and install lmtune with its test, QLoRA and DeepSpeed extras.
# torch is installed first, pinned; every later pip call is constrained to that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,qlora]"
# DeepSpeed builds against the installed torch (no isolated build, no compiled ops: they are JIT-built on use)
.venv/bin/python -m pip install -q -c constraints.txt setuptools wheel
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation "deepspeed>=0.16"
echo "lmtune installed in .venv ($(.venv/bin/lmtune --version))"
