#!/usr/bin/env bash
# Creates benchmarks/.venv-xtuner: a virtual environment holding XTuner 0.2.0 from PyPI, kept apart
# from lmtune's own environment (XTuner pins transformers==4.48.0, mmengine==0.10.6 and
# bitsandbytes==0.45.0, which lmtune's environment must not get).
#
# torch is installed first, and every later pip call is constrained by the repository's
# constraints.txt, so that no dependency of XTuner can replace that torch build.
#
#   bash benchmarks/setup_xtuner_env.sh            # create or complete the environment
#   PYTHON=python3.11 bash benchmarks/setup_xtuner_env.sh
#   XTUNER_VENV=/some/dir bash benchmarks/setup_xtuner_env.sh
#
# At the end it imports xtuner.dataset.process_hf_dataset as the benchmark does (with the stubs of
# benchmarks/xtuner_stubs on PYTHONPATH, see below) and prints the versions it got. Re-running it is
# safe; the first run takes about 2.5 minutes (torch and XTuner's dependencies are downloaded).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${XTUNER_VENV:-$here/.venv-xtuner}"
python="${PYTHON:-python3}"
constraints="$repo/constraints.txt"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

# 1. torch, the same release lmtune runs on.
"${pip[@]}" install --quiet "torch==2.13.0"

# 2. XTuner 0.2.0 and what it needs to import, never replacing torch.
#    - transformers==4.48.0, mmengine==0.10.6 and bitsandbytes==0.45.0 are pinned by xtuner itself;
#      pip picks datasets 5.0.1 (the newest that accepts transformers 4.48's huggingface-hub<1.0).
#    - torchvision: xtuner requires it and xtuner.dataset imports it at module level (for its
#      InternVL image dataset). The registry's torchvision 0.28.0, the release made for torch 2.13.0,
#      links against torch's CUDA libraries (libc10_cuda.so, libtorch_cuda.so): beside the CPU build of
#      torch its C extension does not load and `import torchvision` fails with
#      "RuntimeError: operator torchvision::nms does not exist"; transformers 4.48 then fails too, as
#      it imports torchvision whenever it is installed. So the real torchvision is removed again, and
#      the benchmark puts benchmarks/xtuner_stubs (a torchvision stand-in with the few names xtuner
#      imports) first on PYTHONPATH for the XTuner side only. The text pipeline never uses torchvision.
"${pip[@]}" install --quiet -c "$constraints" "xtuner==0.2.0"
"${pip[@]}" uninstall --quiet -y torchvision || true

# 3. The check the benchmark relies on.
"$venv/bin/python" "$here/_check_xtuner_env.py"
