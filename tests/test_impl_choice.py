"""--impl auto: the fused op where it is the faster (the CPU, fp32, channels_last, Winograd
kernels), native otherwise; resolved at run start, said in the output, recorded in
config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import option
from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.config import TrainConfig
from vggbench.device import choose_impl
from vggbench.train import main

FAST_CPU = torch.ops.vggbench.winograd_isa() != "none"
CPU = torch.device("cpu")
FAST = TrainConfig(channels_last=True)


def test_auto_is_the_default_and_builds_native_layers_outside_a_run() -> None:
    assert TrainConfig().impl == "auto"
    assert TrainConfig().model_spec()["impl"] == "native"


@pytest.mark.skipif(not FAST_CPU, reason="this CPU has no AVX2+FMA: auto never picks the fused op here")
def test_fused_on_the_cpu_in_fp32_channels_last() -> None:
    impl, why = choose_impl(FAST, CPU)
    assert impl == "fused" and torch.ops.vggbench.winograd_isa().upper() in why


@pytest.mark.parametrize(("change", "device", "reason"), [
    ({"channels_last": False}, CPU, "only with --channels-last"),
    ({"precision": "bf16"}, CPU, "--precision bf16: the fused op's convs are fast in fp32 only"),
    ({"activation": "sigmoid"}, CPU, "conv -> BN -> LeakyReLU only"),
    ({"bn_position": "after"}, CPU, "conv -> BN -> LeakyReLU only"),
    ({}, torch.device("cuda"), "on cuda the fused op is not the faster"),
])
def test_native_where_the_fused_op_gains_nothing(change: dict, device: torch.device, reason: str) -> None:
    impl, why = choose_impl(replace(FAST, **change), device)
    assert impl == "native" and reason in why


@pytest.mark.skipif(not FAST_CPU, reason="this CPU has no AVX2+FMA: auto never picks the fused op here")
def test_training_says_and_records_the_choice(tiny_args, capsys) -> None:
    args = [*tiny_args[:tiny_args.index("--epochs") + 1], "1", *tiny_args[tiny_args.index("--epochs") + 2:]]
    run = Path(option(args, "--out-dir"))
    assert main([*args, "--channels-last"]) == 0
    assert "[VGG08 BN+RC] layers: fused (--impl auto: Winograd convs on" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["impl"] == "fused"
