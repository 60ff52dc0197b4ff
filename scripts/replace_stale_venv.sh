#!/usr/bin/env bash
# Make DIR/.venv (default: this checkout's) either a working virtual environment or absent, so that
# install.sh can create it. A .venv that cannot serve the checkout is replaced, never written into:
# - a symbolic link (for example to another machine's environment): the link is removed, its target is
#   left alone;
# - a virtual environment whose Python no longer starts or is older than 3.10: it is deleted;
# - anything else (no pyvenv.cfg, so not an environment install.sh made): it is moved aside, not deleted.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
if [ -L .venv ]; then
    echo "install.sh: .venv is a link to $(readlink .venv), not an environment of this checkout: replacing the link"
    rm .venv
elif [ -e .venv ]; then
    if [ -f .venv/pyvenv.cfg ]; then
        if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            echo "install.sh: .venv's Python does not start (or is older than 3.10): making .venv anew"
            rm -rf .venv
        fi
    else
        aside=".venv.moved-$(date +%Y%m%d-%H%M%S)"
        echo "install.sh: .venv is not a virtual environment (no pyvenv.cfg): moved to $aside"
        mv .venv "$aside"
    fi
fi
