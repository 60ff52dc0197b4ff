#!/usr/bin/env bash
# Create .venv and install lmtune with its test and QLoRA extras.
# torch is installed first, pinned; every later pip call is constrained to that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,qlora]"
echo "lmtune installed in .venv ($(.venv/bin/lmtune --version))"
