#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent: a second
# run only checks that everything is installed (and rebuilds the extension only when its
# sources or build inputs changed).
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
# The editable install compiles the C++ extension from scratch (~4 minutes on 2 cores), so it
# runs only when its inputs changed since the last one that succeeded: the sources, the build
# and dependency files, the Python and torch it builds against, and the build's switches.
build_key() {
    {
        find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum setup.py pyproject.toml constraints.txt
        .venv/bin/python -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"
        for name in VGGBENCH_CPU_ONLY VGGBENCH_FORCE_CUDA CUDA_HOME CUDA_PATH TORCH_CUDA_ARCH_LIST DEBUG; do
            echo "$name=${!name-}"
        done
    } | sha256sum | cut -d" " -f1
}
stamp=.venv/vggbench-build-key
key=$(build_key)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && .venv/bin/python -c "import torch, vggbench._C" 2>/dev/null; then
    echo "setup: vggbench installed, its extension built from these sources (nothing to rebuild)"
else
    echo "setup: vggbench and its dependencies (compiles the C++ extension: minutes on 2 cores)"
    rm -f "$stamp"
    pip_install --no-build-isolation -e ".[test]"
    echo "$key" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"  # only after a complete install
fi
.venv/bin/python -c "import torch, torchvision, vggbench; print(f'setup: ready (torch {torch.__version__}, torchvision {torchvision.__version__})')"
