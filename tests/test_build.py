"""The extension builds CPU-only from a clean tree (VGGBENCH_CPU_ONLY=1) and its op works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.build


def test_cpu_only_build_from_a_clean_tree(tmp_path):
    """Copies setup.py, pyproject.toml and csrc/ and builds vggbench._C with the CPU switch."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "vggbench", tmp_path / "vggbench",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "VGGBENCH_CPU_ONLY": "1", "MAX_JOBS": "2"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "building the CPU kernels only" in build.stdout
    assert not any(".cu" in line for line in build.stdout.splitlines() if "nvcc" in line)
    check = (
        "import torch, vggbench.ops as ops\n"
        "assert 'CUDA' not in torch._C._dispatch_dump('vggbench::conv_bn_act')\n"
        "x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)\n"
        "out = ops.conv_bn_act(x, w, padding=1, negative_slope=0.0)\n"
        "torch.testing.assert_close(out, torch.relu(torch.nn.functional.conv2d(x, w, padding=1)))\n"
        "print(ops.__file__)\n"
    )
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(tmp_path))
