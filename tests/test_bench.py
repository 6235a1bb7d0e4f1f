"""The benchmark suite end to end: `python -m vggbench.bench --quick` writes a JSON, report and charts,
including the gradient-flow equivalence of fused vs native (asserted against float64 in quick mode),
a loss surface on 1 and 2 gloo ranks, the step time's scaling and the ops dispatched per unit
(tests/test_scaling.py checks those two sections' figures against the JSON).

Quick mode with --no-compile here: a cold torch.compile costs ~15 s per graph on a 2-core
CPU, and the suite's torch.compile path is exercised by `python -m vggbench.bench --quick`
run directly. In quick mode each fused benchmark also asserts its errors against native
float64, so this test fails on a numerical regression of the fused op too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggbench.bench", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True,
                          timeout=1800)  # minutes on a loaded 2-core machine


def test_quick_mode_writes_json_report_and_charts(tmp_path):
    run = run_bench("--quick", "--no-compile", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["vggbench"]["mode"] == "quick"
    assert data["machine_info"]["vggbench"]["torch"] == torch.__version__
    layers = [b for b in data["benchmarks"] if b["extra_info"]["kind"] == "layer"]
    models = [b for b in data["benchmarks"] if b["extra_info"]["kind"] == "model"]
    assert {b["extra_info"]["impl"] for b in layers} == {"eager", "fused"}
    assert {b["extra_info"]["pass"] for b in layers} == {"trainfwd", "fwdbwd", "evalfwd"}
    assert {b["extra_info"]["impl"] for b in models} == {"native", "fused", "gradflow", "probe"}
    flows = {b["extra_info"]["label"]: b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["kind"] == "flow"}
    assert set(flows) == {"VGG08", "VGG38", "VGG38 BN", "VGG38 BN+RC"}
    for info in flows.values():
        assert info["steps"] >= 20 and info["passed"]
        for stat in ("mean_abs", "max_abs", "l2"):
            s = info["stats"][stat]
            assert s["fused_vs_float64"]["max"] <= s["tolerance"] and s["native_vs_float64"]["layer"]
            assert 0 < s["native_vs_float64"]["max"] < 1  # native float32 is off the truth, but not by O(1)
    scaling = [b for b in data["benchmarks"] if b["extra_info"]["kind"] == "scaling"]
    assert {(b["extra_info"]["threads"], b["extra_info"]["impl"]) for b in scaling} == {
        (t, impl) for t in (1, 2) for impl in ("native", "fused")}
    counts = {b["extra_info"]["impl"]: b["extra_info"]["counts"] for b in data["benchmarks"]
              if b["extra_info"]["kind"] == "op_counts"}
    assert set(counts) == {"native", "fused"} and all(counts[impl]["forward"] for impl in counts)
    surfaces = {b["extra_info"]["impl"]: b for b in data["benchmarks"] if b["extra_info"]["kind"] == "surface"}
    assert set(surfaces) == {"1rank", "2ranks"} and surfaces["2ranks"]["extra_info"]["ranks"] == 2
    for b in layers:
        info = b["extra_info"]
        assert b["stats"]["rounds"] == 3 and b["stats"]["median"] > 0
        assert info["speedup"] == pytest.approx(info["baseline_median_s"] / b["stats"]["median"])
        assert info["within_tolerance"] or info["impl"] != "fused"
        assert set(info["errors"]) == {"vs_eager", "vs_float64"}
        if info["pass"] == "fwdbwd":
            assert {"out", "grad_weight", "grad_bn_weight", "grad_bn_bias"} <= set(info["errors"]["vs_eager"])
        if info["pass"] != "evalfwd":
            assert info["saved_activation_bytes"] > 0
    report = (tmp_path / "report.md").read_text()
    for heading in ("## Machine and software", "## Targets", "### training forward+backward", "## Numerical agreement",
                    "## Bytes saved for backward", "## Model training step", "Gradient-flow recording",
                    "Landscape probe", "## Gradient-flow equivalence", "## Loss surface over ranks",
                    "## How cost grows", "## Ops dispatched per unit", "ATen CPU capability"):
        assert heading in report
    assert "issue" not in report.lower()  # the report states its targets itself
    for chart in ("speedup.png", "memory.png", "throughput.png", "gradflow-equivalence.png", "scaling.png"):
        assert (tmp_path / chart).read_bytes().startswith(b"\x89PNG"), chart


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    run = run_bench("--device", "cuda", "--out", str(tmp_path))
    assert run.returncode == 2
    assert "CUDA is not available on this machine" in run.stderr


@pytest.mark.parametrize("args, status, message", [
    (["--out", "{tmp}/a-file/out"], 2,
     "--out: cannot write into {tmp}/a-file/out: Not a directory"),
    (["-k", "((("], 4, "pytest refused its arguments: its error is above"),
    (["-k", "no_such_benchmark"], 5, "-k 'no_such_benchmark' selects no benchmark"),
])
def test_bad_options_are_clear_errors(tmp_path, args, status, message):
    (tmp_path / "a-file").write_text("in the way")
    args = [arg.format(tmp=tmp_path) for arg in args]
    run = run_bench("--no-compile", *(["--out", str(tmp_path / "out")] if "--out" not in args else []), *args)
    assert run.returncode == status
    assert message.format(tmp=tmp_path) in run.stderr
    assert "Traceback" not in run.stderr
