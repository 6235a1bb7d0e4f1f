#!/usr/bin/env bash
# Check the CUDA path on a machine with an NVIDIA GPU: build for this GPU only, CUDA tests,
# compute-sanitizer, the GPU benchmark slice and a 1-GPU NCCL launch; writes
# OUT_DIR/gpu-check.{json,md}. Uses the torch already installed (PYTHON, else .venv's
# Python when there is one, else python3); downloads nothing. See vggbench/gpu_check.py.
#   bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
exec "$PYTHON" -m vggbench.gpu_check --python "$(command -v "$PYTHON")" "$1"
