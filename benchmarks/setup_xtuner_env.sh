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
# benchmarks/xtuner_stubs on PYTHONPATH, see below) and prints the versions it got.
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
#    - transformers==4.48.0 and mmengine==0.10.6 are pinned by xtuner itself.
#    - torchvision: xtuner requires it and xtuner.dataset imports it at module level (for its
#      InternVL image dataset). The registry's torchvision 0.28.0, the release made for torch 2.13.0,
#      links against torch's CUDA libraries (libc10_cuda.so, libtorch_cuda.so): beside the CPU build of
#      torch its C extension does not load and `import torchvision` fails with
#      "operator torchvision::nms does not exist", and transformers 4.48 then fails too (it imports
#      torchvision whenever it is installed). So the real torchvision is removed again, and the
#      benchmark puts benchmarks/xtuner_stubs (a torchvision stand-in with the few names xtuner
#      imports) first on PYTHONPATH for the XTuner side only. The text pipeline never uses torchvision.
"${pip[@]}" install --quiet -c "$constraints" "xtuner==0.2.0"
"${pip[@]}" uninstall --quiet -y torchvision || true

# 3. The check the benchmark relies on.
"$venv/bin/python" - "$here" <<'EOF'
import importlib, subprocess, sys

here = sys.argv[1]
def try_import(extra_path):
    code = "import xtuner.dataset; from xtuner.dataset import process_hf_dataset; print('ok')"
    env_path = f"{extra_path}" if extra_path else ""
    import os
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = env_path + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)

plain = try_import(None)
if plain.returncode == 0:
    print("xtuner.dataset imports without stubs")
else:
    print("xtuner.dataset does not import as installed; last lines:")
    print("\n".join(plain.stderr.strip().splitlines()[-5:]))
    stubbed = try_import(f"{here}/xtuner_stubs")
    if stubbed.returncode != 0:
        print("and not with benchmarks/xtuner_stubs either:")
        print(stubbed.stderr[-3000:])
        sys.exit(1)
    print("xtuner.dataset imports with benchmarks/xtuner_stubs on PYTHONPATH (the benchmark does this)")

from importlib.metadata import version
for name in ("xtuner", "torch", "torchvision", "transformers", "tokenizers", "datasets", "mmengine", "numpy"):
    try:
        print(f"  {name}=={version(name)}")
    except Exception:
        print(f"  {name}: not installed")
EOF
