"""The CUDA-graph variants in the benchmark report and gpu-check.md: their columns, rows and the GPU
targets checked against a benchmark JSON as a CUDA run writes it (the figures are given here: what is
tested is how the report reads them; tests/test_cuda.py and scripts/gpu_check.sh measure real ones)."""

from __future__ import annotations

import json
from pathlib import Path

from vggbench import gpu_check
from vggbench.bench import markdown, results
from vggbench.bench.layer_cases import GRAPH_IMPLS, LayerCase, base_impl, layer_cases
from vggbench.bench.model_cases import ModelCase, model_cases

UNIT = "res-N100-H32-bfloat16-channels_last"
MODEL = "step-vgg38bnrc-N100-H32-bf16"


def layer(impl: str, pass_: str, speedup: float) -> dict:
    info = {"kind": "layer", "case": UNIT, "unit": "res", "n": 100, "size": 32, "dtype": "bfloat16",
            "layout": "channels_last", "pass": pass_, "impl": impl, "speedup": speedup, "baseline_median_s": 2e-4}
    return {"group": f"{UNIT}-{pass_}", "name": f"test_layer[{UNIT}-{pass_}-{impl}]",
            "stats": {"median": 2e-4 / speedup, "iqr": 0.0, "rounds": 10}, "extra_info": info}


def step(impl: str, speedup: float, syncs: int) -> dict:
    info = {"kind": "model", "model": "vgg38bnrc", "label": "VGG38 BN+RC (bf16 autocast)", "n": 100, "size": 32,
            "autocast": True, "impl": impl, "speedup": speedup, "baseline_median_s": 0.02,
            "host_syncs_per_step": syncs}
    return {"group": MODEL, "name": f"test_step[{MODEL}-{impl}]", "stats": {"median": 0.02 / speedup, "iqr": 0.0,
                                                                            "rounds": 5}, "extra_info": info}


def write_run(path: Path, device: str, with_graphs: bool = True) -> Path:
    """A benchmark JSON of the GPU slice's key groups: fused 1.5x eager on the unit, 1.2x native on the step
    (short of 1.3x) with one host sync, 2.5x from a CUDA graph with none."""
    benchmarks = [layer("eager", "trainfwd", 1.0), layer("fused", "trainfwd", 1.1),
                  layer("eager", "fwdbwd", 1.0), layer("fused", "fwdbwd", 1.5),
                  step("native", 1.0, 0), step("fused", 1.2, 1)]
    if with_graphs:
        benchmarks += [layer("eager+graph", "fwdbwd", 1.25), layer("fused+graph", "fwdbwd", 2.0),
                       step("native+graph", 1.6, 0), step("fused+graph", 2.5, 0)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmarks": benchmarks, "machine_info": {"vggbench": {}},
                                "vggbench": {"device": device, "mode": "full"}, "datetime": "now"}))
    return path


def test_graph_variants_run_on_cuda_only_forward_backward_only():
    cpu, cuda = layer_cases(quick=False), layer_cases(quick=False, graphs=True)
    assert not any(impl in GRAPH_IMPLS for case in cpu for p in ("trainfwd", "fwdbwd") for impl in case.impls(p))
    unit = next(case for case in cuda if case.name == UNIT)
    assert unit.impls("fwdbwd")[-2:] == GRAPH_IMPLS and not set(GRAPH_IMPLS) & set(unit.impls("trainfwd"))
    assert UNIT not in {case.name for case in cpu}  # the bf16 residual unit is the GPU's case
    assert base_impl("fused+graph") == "fused" and base_impl("eager") == "eager"
    assert LayerCase("res", 8, 8, "float32", "channels_last").impls("fwdbwd") == ("eager", "compile", "fused")
    assert [c.group for c in model_cases(quick=False)] == [c.group for c in model_cases(quick=False, graphs=True)]
    assert model_cases(quick=False)[-1].impls == ("native", "fused")  # the CPU's bf16 step: no graphs
    bf16 = model_cases(quick=False, graphs=True)[-1]
    assert bf16 == ModelCase("vgg38bnrc", 100, autocast=True, graphs=True) and bf16.group == MODEL
    assert bf16.impls == ("native", "fused", "native+graph", "fused+graph")


def test_report_shows_graph_columns_rows_and_gpu_targets(tmp_path):
    run = results.load(write_run(tmp_path / "benchmark.json", "cuda"))
    tables = "\n".join(markdown.layer_time_sections(run))
    fwdbwd = tables.split("### training forward+backward")[1]
    assert "| eager+graph ms | fused+graph ms | fused+graph/eager |" in fwdbwd
    assert fwdbwd.split("\n")[4].endswith("| 0.16 (0.2) | 0.1 (0.2) | 0.50 |")
    assert "graph" not in tables.split("### training forward+backward")[0].split("### training forward")[1]
    models = "\n".join(markdown.models_section(run))
    assert "| VGG38 BN+RC (bf16 autocast), batch 100 | fused, CUDA graph replay | 8 (20) | 12500 | 0.40 | 0 |" in models
    assert "| VGG38 BN+RC (bf16 autocast), batch 100 | fused | 16.7 (20) | 6000 | 0.83 | 1 |" in models
    targets = markdown.gpu_targets_section(run)
    assert targets[0] == "## GPU targets"
    assert ("- [ ] FAIL: VGG38 BN+RC training step (batch 100, bf16 autocast), fused vs native eager: >= 1.3x the "
            f"images/s: 0.833x > 0.769x (`{MODEL}`, time)") in targets
    graph_line = ("- [x] PASS: VGG38 BN+RC training step (batch 100, bf16 autocast), fused replayed from a CUDA graph "
                  "vs native eager: >= 2x the images/s: 0.4x <= 0.5x")
    assert any(line.startswith(graph_line) for line in targets)
    assert f"0.667x <= 0.8x (`{UNIT}-fwdbwd`, time)" in "\n".join(targets)
    assert ("- [ ] FAIL: host syncs per VGG38 BN+RC training step (bf16 autocast), fused eager: 1 > 0 "
            f"(`{MODEL}`, host syncs per step)") in targets
    assert any(line.startswith("- [x] PASS: host syncs per") and "CUDA graph: 0 <= 0" in line for line in targets)
    assert markdown.gpu_targets_section(results.load(write_run(tmp_path / "cpu.json", "cpu"))) == []


def test_gpu_check_report_states_the_targets_against_the_slice(tmp_path):
    """gpu-check.md carries the GPU targets of the slice's report.md (the orchestrating Python may have no
    torch to read the JSON with)."""
    run = results.load(write_run(tmp_path / "bench" / "benchmark.json", "cuda", with_graphs=False))
    sections = [markdown.machine_section(run), markdown.gpu_targets_section(run), markdown.targets_section(run)]
    (tmp_path / "bench" / "report.md").write_text("\n".join(line for section in sections for line in section))
    report = {"verdict": "failed", "out_dir": str(tmp_path), "machine": {"gpu": "NVIDIA H200"},
              "steps": [{"name": "bench", "status": "passed", "seconds": 90.0, "returncode": 0, "tail": ""}]}
    text = gpu_check.render_markdown(report)
    assert "## GPU targets" in text and "## Targets" not in text and "## Machine" not in text
    assert f"0.833x > 0.769x (`{MODEL}`, time)" in text
    assert (f"- [ ] NOT MEASURED: VGG38 BN+RC training step (batch 100, bf16 autocast), fused replayed from a CUDA "
            f"graph vs native eager: >= 2x the images/s <= 0.5x (needs `{MODEL}` fused+graph and native in one run: "
            "the full suite)") in text
    report["out_dir"] = str(tmp_path / "elsewhere")  # the slice did not run: no targets, no error
    assert "GPU targets" not in gpu_check.render_markdown(report)
