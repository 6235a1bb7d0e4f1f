"""--impl auto: the fused op where it is the faster (the CPU, fp32 or bf16, Winograd kernels;
contiguous too, except bf16 where ATen has bf16 dot products), native otherwise;
--channels-last unset: channels_last on the CPU, contiguous elsewhere; both resolved at run
start, said in the output, recorded in config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import option
from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.config import TrainConfig
from vggbench.device import choose_channels_last, choose_impl
from vggbench.resume import resume_state
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


@pytest.mark.skipif(not FAST_CPU, reason="this CPU has no AVX2+FMA: auto never picks the fused op here")
def test_bf16_fused_where_the_winograd_convs_take_it() -> None:
    impl, why = choose_impl(replace(FAST, precision="bf16"), CPU)
    if torch.ops.vggbench.winograd_takes_bfloat16():
        assert (impl, why) == ("fused", f"Winograd convs on {torch.ops.vggbench.winograd_isa().upper()}, "
                                        "channels_last, bf16")
    else:
        assert impl == "native" and "AMX-BF16" in why


@pytest.mark.skipif(not FAST_CPU, reason="this CPU has no AVX2+FMA: auto never picks the fused op here")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_contiguous_fused_through_channels_last_copies(precision: str) -> None:
    impl, why = choose_impl(replace(FAST, channels_last=False, precision=precision), CPU)
    if precision == "bf16" and not torch.ops.vggbench.winograd_takes_bfloat16():
        assert impl == "native" and "AMX-BF16" in why
    elif precision == "bf16" and torch.ops.vggbench.native_bf16_dot_products():
        assert impl == "native" and "only in channels_last" in why
    else:
        assert (impl, why) == ("fused", f"Winograd convs on {torch.ops.vggbench.winograd_isa().upper()}, "
                                        f"contiguous through channels_last copies, {precision}")


@pytest.mark.parametrize(("change", "device", "reason"), [
    ({"precision": "fp16"}, CPU, "--precision fp16: the fused op's convs are fast in fp32 and bf16 only"),
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


def test_channels_last_unless_told_on_the_cpu_only() -> None:
    assert TrainConfig().channels_last is None  # unset: chosen at run start
    assert choose_channels_last(CPU) == (True,
                                         "the faster on the CPU, where the fused op's Winograd convs compute in it")
    assert choose_channels_last(torch.device("cuda")) == (False, "on cuda channels_last is not measured faster")


@pytest.mark.skipif(not FAST_CPU, reason="this CPU has no AVX2+FMA: auto never picks the fused op here")
def test_training_takes_the_fast_path_by_default_and_says_so(tiny_args, capsys) -> None:
    args = [*tiny_args[:tiny_args.index("--epochs") + 1], "1", *tiny_args[tiny_args.index("--epochs") + 2:]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[VGG08 BN+RC] memory format: channels_last (--channels-last unset: the faster on the CPU" in out
    assert "[VGG08 BN+RC] layers: fused (--impl auto: Winograd convs on" in out
    saved = json.loads((Path(option(args, "--out-dir")) / "config.json").read_text())
    assert (saved["channels_last"], saved["impl"]) == (True, "fused")


def test_no_channels_last_trains_contiguous(tiny_args, capsys) -> None:
    args = [*tiny_args[:tiny_args.index("--epochs") + 1], "1", *tiny_args[tiny_args.index("--epochs") + 2:]]
    run = Path(option(args, "--out-dir"))
    assert main([*args, "--no-channels-last"]) == 0
    out = capsys.readouterr().out
    assert "memory format:" not in out
    expected = "fused (--impl auto: Winograd convs on" if FAST_CPU else "native (--impl auto:"
    assert f"[VGG08 BN+RC] layers: {expected}" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["channels_last"] is False
    # resumed without saying (as the demo resumes: explicit=None checks every option), the run keeps its choice
    fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}  # not the run's facts
    cfg, state = resume_state(TrainConfig(**{**fields, "channels_last": None, "resume": "latest"}), explicit=None)
    assert state is not None and cfg.channels_last is False
