"""How cost grows, in the benchmark report: the scaling cases, their selection with -k, and the
report's table and chart (and the op counts' table) from a real quick run of those parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vggbench.bench.machine import instruction_sets, vector_extensions
from vggbench.bench.model_cases import MODELS
from vggbench.bench.op_counts import PHASES
from vggbench.bench.scaling import scaling_cases, torch_threads
from vggbench.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_full_mode_covers_depth_batch_and_threads() -> None:
    cases = scaling_cases(quick=False)
    assert {(c.model, c.n, c.threads) for c in cases} == {
        (m, n, t) for m in ("vgg08bnrc", "vgg38bnrc", "vgg98bnrc") for n in (32, 100, 256) for t in (1, 2)}
    assert len({c.group for c in cases}) == len(cases) == 18
    vgg98 = build_model(*MODELS["vgg98bnrc"])  # `--model vgg98` builds: the deepest point of the grid
    assert vgg98.spec.depth == 98 and vgg98.spec.batch_norm and vgg98.spec.residual


def test_torch_threads_restores_the_count_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("step failed")
    assert torch.get_num_threads() == before


def collected(*args: str) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--bench-quick", "--collect-only", "-q",
                          *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_k_leaves_the_scaling_out() -> None:
    assert sum("test_scale[" in t for t in collected()) == 2 * len(scaling_cases(quick=True))
    kept = collected("-k", "not scale")
    assert kept and not any("test_scale[" in t for t in kept)


def test_cpuinfo_flags_name_the_vector_extensions(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n\n")
    assert vector_extensions(cpuinfo) == ["avx2", "avx512bw", "avx512f", "fma"]
    assert vector_extensions(tmp_path / "missing") == []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """`python -m vggbench.bench --quick -k "scale or op_counts"`: its output directory, JSON and report."""
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, "-m", "vggbench.bench", "--quick", "--no-compile", "-k", "scale or op_counts",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return out, json.loads((out / "benchmark.json").read_text()), (out / "report.md").read_text()


def table_rows(report: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`, header and separator left out."""
    section = report.split(heading, 1)[1]
    lines = [line for line in section.split("\n\n| ", 1)[1].split("\n\n")[0].splitlines()]
    return [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines[2:]]


def test_report_tables_the_step_time_of_every_configuration(quick_run) -> None:
    out, data, report = quick_run
    records = {(b["extra_info"]["label"], b["extra_info"]["n"], b["extra_info"]["threads"], b["extra_info"]["impl"]): b
               for b in data["benchmarks"] if b["extra_info"]["kind"] == "scaling"}
    assert {(label, n, t) for label, n, t, _ in records} == {
        (label, n, t) for label in ("VGG08 BN+RC", "VGG14 BN+RC") for n in (2, 4) for t in (1, 2)}
    rows = table_rows(report, "## How cost grows")
    assert len(rows) == 8
    for label, n, threads, native_ms, fused_ms, ratio, native_per_image, _ in rows:
        native, fused = (records[(label, int(n), int(threads), impl)] for impl in ("native", "fused"))
        assert float(native_ms) == pytest.approx(native["stats"]["median"] * 1e3, rel=0.01)
        assert float(fused_ms.split(" (")[0]) == pytest.approx(fused["stats"]["median"] * 1e3, rel=0.01)
        assert float(ratio) == pytest.approx(1 / fused["extra_info"]["speedup"], abs=0.006)
        assert float(native_per_image) == pytest.approx(native["stats"]["median"] * 1e3 / int(n), rel=0.01, abs=0.006)
    assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG") and "scaling.png" in report
    isa = instruction_sets()
    assert {key: data["machine_info"]["vggbench"][key] for key in isa} == isa
    assert isa["cpu_vector_extensions"] == (" ".join(vector_extensions()) or "unknown")
    named = (f"vector extensions {isa['cpu_vector_extensions']}; ATen CPU capability {isa['aten_cpu_capability']}; "
             f"Winograd kernels {isa['winograd_isa']}")
    assert report.count(named) == 2  # in the machine section and the scaling section


def test_report_tables_the_ops_dispatched_per_unit(quick_run) -> None:
    _, data, report = quick_run
    counts = {b["extra_info"]["impl"]: b["extra_info"]["counts"] for b in data["benchmarks"]
              if b["extra_info"]["kind"] == "op_counts"}
    assert set(counts) == {"native", "fused"}
    rows = table_rows(report, "## Ops dispatched per unit")
    assert {row[0]: row[1:] for row in rows} == {
        impl: [str(sum(counts[impl][phase].values())) for phase in PHASES] for impl in counts}
    assert counts["native"]["forward"]["aten::conv2d"] == 1
