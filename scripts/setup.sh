#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent: a second
# run only checks that everything is installed.
#   torch/torchvision: pinned in constraints.txt (the pair that works on this machine kind)
#   vggbench: editable install with its test extras, without build isolation so the
#             C++ extension (when present) builds against the installed torch
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "$@"; }
pip_install "setuptools>=64" wheel
echo "setup: torch and torchvision (first run: ~2 minutes, a multi-GB install)"
pip_install torch torchvision
echo "setup: vggbench and its dependencies"
pip_install --no-build-isolation -e ".[test]"
.venv/bin/python -c "import torch, torchvision, vggbench; print(f'setup: ready (torch {torch.__version__}, torchvision {torchvision.__version__})')"
