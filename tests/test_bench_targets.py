"""The CPU targets of the benchmark report checked against a benchmark JSON as the suite writes it: a target
over every layer shape (a wildcard group, judged by its worst group) and one that applies only where the
machine has a feature (the bfloat16 target: native bfloat16 convs with bfloat16 dot products). The figures are
given here: what is tested is how the report reads them (the suite measures real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vggbench.bench import markdown, results

EVERY_LAYER = "every layer shape of the study at batch 100"
BF16 = "bfloat16 (autocast) training forward+backward, fused vs native bfloat16 eager"


def layer(case: str, pass_: str, impl: str, speedup: float) -> dict:
    unit, _, size, dtype, layout = case.split("-")
    info = {"kind": "layer", "case": case, "unit": unit, "n": 100, "size": int(size[1:]), "dtype": dtype,
            "layout": layout, "pass": pass_, "impl": impl, "speedup": speedup, "baseline_median_s": 1e-3}
    return {"group": f"{case}-{pass_}", "name": f"test_layer[{case}-{pass_}-{impl}]",
            "stats": {"median": 1e-3 / speedup, "iqr": 0.0, "rounds": 10}, "extra_info": info}


def write_run(path: Path, fused_speedups: dict[str, float], machine: dict) -> results.Results:
    """A CPU run with, per "case/pass" key, native eager and fused at the given speedup over it."""
    benchmarks = []
    for key, speedup in fused_speedups.items():
        case, pass_ = key.split("/")
        benchmarks += [layer(case, pass_, "eager", 1.0), layer(case, pass_, "fused", speedup)]
    path.write_text(json.dumps({"benchmarks": benchmarks, "machine_info": {"vggbench": machine},
                                "vggbench": {"device": "cpu", "mode": "full"}, "datetime": "now"}))
    return results.load(path)


def line_of(run: results.Results, what: str) -> str:
    return next(line for line in markdown.targets_section(run) if what in line)


SHAPES = {"entry-N100-H16-float32-channels_last/evalfwd": 1 / 0.8,
          "conv-N100-H32-float32-channels_last/fwdbwd": 1 / 0.4,
          "conv-N100-H32-bfloat16-channels_last/fwdbwd": 1 / 0.7,
          "conv-N100-H8-float32-contiguous/evalfwd": 1 / 0.99}  # not the layout the study trains in: not judged


def test_every_layer_target_is_judged_by_its_worst_channels_last_group(tmp_path):
    run = write_run(tmp_path / "pass.json", SHAPES, {})
    assert run.groups("*-N100-H*-channels_last-*") == [
        "entry-N100-H16-float32-channels_last-evalfwd", "conv-N100-H32-float32-channels_last-fwdbwd",
        "conv-N100-H32-bfloat16-channels_last-fwdbwd"]
    assert line_of(run, EVERY_LAYER).startswith("- [x] PASS: ")
    assert line_of(run, EVERY_LAYER).endswith(
        ": 0.8x <= 0.9x (worst of 3 groups: `entry-N100-H16-float32-channels_last-evalfwd`, time)")
    slow = write_run(tmp_path / "fail.json", {**SHAPES, "res-N100-H8-float32-channels_last/trainfwd": 1 / 0.95}, {})
    assert line_of(slow, EVERY_LAYER).startswith("- [ ] FAIL: ")
    assert line_of(slow, EVERY_LAYER).endswith(
        ": 0.95x > 0.9x (worst of 4 groups: `res-N100-H8-float32-channels_last-trainfwd`, time)")
    # the key unit's own target names its single group
    assert line_of(run, "training forward+backward, fused vs native eager").endswith(
        ": 0.4x <= 0.45x (`conv-N100-H32-float32-channels_last-fwdbwd`, time)")


@pytest.mark.parametrize(("machine", "verdict"), [
    ({}, "- [ ] NOT APPLICABLE here: "),
    ({"native_bf16_dot_products": False}, "- [ ] NOT APPLICABLE here: "),
    ({"native_bf16_dot_products": True}, "- [ ] FAIL: "),
])
def test_bfloat16_target_applies_where_native_bf16_convs_have_dot_products(tmp_path, machine, verdict):
    run = write_run(tmp_path / "run.json", SHAPES, machine)
    line = line_of(run, BF16)
    assert line.startswith(verdict)
    if machine.get("native_bf16_dot_products"):
        assert line.endswith(": 0.7x > 0.6x (`conv-N100-H32-bfloat16-channels_last-fwdbwd`, time)")
    else:
        assert line.endswith(f"(native bf16 dot products: {machine.get('native_bf16_dot_products', 'not recorded')})")
    flag = {True: "yes", False: "no"}.get(machine.get("native_bf16_dot_products"), "–")
    assert f"bfloat16 dot products in ATen's bfloat16 convs: {flag}." in markdown.machine_section(run)[2]


def test_targets_not_run_are_not_measured(tmp_path):
    run = write_run(tmp_path / "run.json", {"entry-N100-H8-float32-contiguous/fwdbwd": 2.0},
                    {"native_bf16_dot_products": True})
    assert line_of(run, EVERY_LAYER).startswith("- [ ] NOT MEASURED: ")
    assert line_of(run, BF16).startswith("- [ ] NOT MEASURED: ")
