"""Helpers shared by the test modules (the fused op's sample calls live in tests/test_ops.py,
which the other op tests import)."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vggbench.models import build_model

TIMING = ("epoch_time_s", "images_per_s")  # metrics that differ between identical runs
# the CPU's feature flags (Linux; empty elsewhere)
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else [])


def option(args: list[str], name: str) -> str:
    """The value following `name` in a command line."""
    return args[args.index(name) + 1]


def set_option(args: list[str], name: str, value: str) -> list[str]:
    """A copy of `args` with the value of option `name` replaced."""
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def metrics(run: Path) -> list[dict]:
    """The rows of a run directory's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock columns, for comparing runs."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def twin_models(variant: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A native VGG38 (filters=8) and a fused one with the same weights."""
    native = build_model("vgg38", variant, filters=8, **overrides)
    fused = build_model("vgg38", variant, filters=8, impl="fused", **overrides)
    fused.load_state_dict(native.state_dict())
    return native, fused


def train_steps(model: torch.nn.Module, dtype: torch.dtype, steps: int, *, device: str = "cpu",
                layout: torch.memory_format = torch.channels_last, autocast: torch.dtype | None = None) -> list[float]:
    """Losses of `steps` Adam steps on fixed random batches (the same images in every dtype and on
    every device) in `layout`; `autocast`: forward and loss run under torch.autocast in that dtype."""
    model.to(device=device, dtype=dtype)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images = torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64)
        images = images.to(device, dtype).contiguous(memory_format=layout)
        labels = torch.randint(0, 100, (16,), generator=generator).to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def relative_errors(losses: list[float], truth: list[float]) -> list[float]:
    return [abs(a - t) / abs(t) for a, t in zip(losses, truth)]


def assert_fused_trains_like_native(device: str = "cpu", layout: torch.memory_format = torch.channels_last,
                                    autocast: torch.dtype | None = None, steps: int = 4) -> None:
    """VGG38 BN+RC (residual reduction) trained natively and fused from the same initialisation.

    float64 isolates the maths: the two differ only in summation order, so losses and
    weights agree to ~1e-12. In float32 (or under autocast) a 37-conv net amplifies rounding
    step by step, so both low-precision runs are compared with the float64 one (the truth),
    and the fused run may drift from it at most 4x as far as native does on this machine
    (by step i, the largest native drift so far), plus a floor of 8 roundings of the
    compute dtype for the first steps where native happens to round luckily.
    """
    torch.manual_seed(0)
    native, fused = twin_models("bn_rc", residual_reduction=True)
    fused_low, native_low = copy.deepcopy(fused), copy.deepcopy(native)
    run = functools.partial(train_steps, steps=steps, device=device, layout=layout)
    truth = run(native, torch.float64)
    assert run(fused, torch.float64) == pytest.approx(truth, rel=1e-10)
    # rtol 1e-6: a conv bias feeding BN has a true gradient of 0, and Adam rescales
    # the rounding noise that replaces it to a full-size step
    torch.testing.assert_close(fused.state_dict(), native.state_dict(), rtol=1e-6, atol=1e-8)
    fused_drift = relative_errors(run(fused_low, torch.float32, autocast=autocast), truth)
    native_drift = relative_errors(run(native_low, torch.float32, autocast=autocast), truth)
    floor = 8 * torch.finfo(autocast or torch.float32).eps
    for step, fused_error in enumerate(fused_drift):
        allowed = 4 * max(native_drift[: step + 1]) + floor
        assert fused_error <= allowed, f"step {step + 1}: fused {fused_drift}, native {native_drift}"
    if autocast is None:
        assert max(native_drift) < 1e-2  # the float64 truth is the same model: native float32 stays near it


@contextmanager
def cudnn_flags(*, deterministic: bool) -> Iterator[None]:
    """IEEE float32 in cuDNN (no TF32: the float32 tolerances assume it); with `deterministic`,
    cuDNN's deterministic algorithms (no atomics in its backward: tests asserting bitwise equality
    of results that include it need them). A no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=deterministic, allow_tf32=False):
        yield
