#!/usr/bin/env bash
# Creates benchmarks/.venv-trl: TRL from PyPI in its own environment, beside lmtune's. torch is
# installed first (the same pinned build), and every later pip call is constrained by constraints.txt.
#
#   bash benchmarks/setup_trl_env.sh
#   .venv/bin/python benchmarks/train_speed.py OUT --device cpu --dtype fp32 --trl-python benchmarks/.venv-trl/bin/python
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${TRL_VENV:-$here/.venv-trl}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -c "$repo/constraints.txt" "trl>=1.0" peft datasets
"$venv/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
