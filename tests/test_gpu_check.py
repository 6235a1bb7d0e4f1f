"""scripts/gpu_check.sh: without a GPU it says so, records it, and exits non-zero."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from vggbench.gpu_check import NO_GPU_STATUS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_fails(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == NO_GPU_STATUS, run.stdout + run.stderr
    assert "no CUDA GPU is visible here" in run.stderr
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["verdict"] == "no GPU" and report["steps"] == []
    assert "No step ran" in (tmp_path / "out" / "gpu-check.md").read_text()


def test_usage_error_without_an_output_directory():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 2 and "usage: bash scripts/gpu_check.sh OUT_DIR" in run.stderr
