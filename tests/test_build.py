"""The extension builds CPU-only from a clean tree (VGGBENCH_CPU_ONLY=1) and its op works; and
its AVX-512 code, built emulated (VGGBENCH_EMULATE_AVX512), passes the kernel tests on any
AVX2 CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CPU_FLAGS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.build


def build_clean_tree(dest: Path, **env: str) -> subprocess.CompletedProcess:
    """Copies setup.py, pyproject.toml, README.md, csrc/ and vggbench/ (without built files) into
    `dest` and builds vggbench._C there, CPU-only, with `env` added to the environment."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "csrc", dest / "csrc")
    shutil.copytree(ROOT / "vggbench", dest / "vggbench", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest,
                           env={**os.environ, "VGGBENCH_CPU_ONLY": "1", "MAX_JOBS": "2", **env},
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return build


def test_cpu_only_build_from_a_clean_tree(tmp_path):
    """Builds vggbench._C from a copy of the sources with the CPU switch; its op works."""
    build = build_clean_tree(tmp_path)
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


# The tests run on the emulated build: those of the Winograd kernels (against native float64,
# and their AVX-512 path and whole units against the forced AVX2 path's bits) and of the op on
# the CPU (against native float64).
EMULATED_TESTS = ("tests/test_winograd.py", "tests/test_ops.py", "tests/test_op_recovery.py")


@pytest.mark.skipif(not {"avx2", "fma"} <= CPU_FLAGS, reason="the emulated AVX-512 build runs on AVX2+FMA CPUs")
def test_emulated_avx512_build_passes_the_kernel_tests(tmp_path):
    """The AVX-512 code on any AVX2 CPU. Built with VGGBENCH_EMULATE_AVX512 (a test-only switch),
    the AVX-512 kernels and passes compile from their own source, at their width (16 floats),
    with their register tiles and thresholds, each 16-float register a pair of AVX2 ones, and
    the build takes them as this CPU's widest path."""
    build_clean_tree(tmp_path, CPPFLAGS="-DVGGBENCH_EMULATE_AVX512")
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("VGGBENCH_")}
    env.update(PYTHONPATH=str(tmp_path), VGGBENCH_TEST_EMULATED_AVX512="1")  # tests/test_winograd.py: cpu_widest
    isa = subprocess.run([sys.executable, "-c", "import torch, vggbench.ops; print(torch.ops.vggbench.winograd_isa())"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert isa.stdout.strip() == "avx512", isa.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EMULATED_TESTS],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
