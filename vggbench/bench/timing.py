"""How the suite times: rounds per group, device synchronisation, interleaved baselines.

Every implementation in a benchmark group (same shape, dtype, layout and pass) is timed
with the same number of rounds, chosen from one call of the first implementation timed
in the group (native eager, which runs first), with pytest-benchmark's default timer
(time.perf_counter). Speedups are paired measurements of the same run: before each round
of a non-baseline implementation, outside its timing, one call of the baseline (native
eager) is timed with the same timer, and the speedup is the median of those baseline calls
over the median of the rounds. Load from other processes and the machine's drift then hit
both sides alike, which two blocks timed one after the other do not guarantee.

On CUDA each round starts after torch.cuda.synchronize() (outside the timing) and the
timed function ends with one, so a round measures the kernels, not their launch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPolicy:
    """Rounds per benchmark: `target_seconds` of timed calls, clamped to [min_rounds, max_rounds]."""

    warmup_rounds: int
    min_rounds: int
    max_rounds: int
    target_seconds: float

    def rounds_for(self, seconds_per_call: float) -> int:
        """Rounds for a function taking `seconds_per_call`."""
        wanted = math.ceil(self.target_seconds / max(seconds_per_call, 1e-9))
        return max(self.min_rounds, min(self.max_rounds, wanted))


QUICK_POLICY = TimingPolicy(warmup_rounds=1, min_rounds=3, max_rounds=3, target_seconds=0.0)
LAYER_POLICY = TimingPolicy(warmup_rounds=2, min_rounds=10, max_rounds=200, target_seconds=2.0)
MODEL_POLICY = TimingPolicy(warmup_rounds=2, min_rounds=5, max_rounds=50, target_seconds=5.0)
# A VGG98 BN+RC step at batch 256 on one thread takes seconds: few rounds, still a median of >= 3.
SCALING_POLICY = TimingPolicy(warmup_rounds=1, min_rounds=3, max_rounds=20, target_seconds=2.0)


def synchronized(fn: Callable[[], object],
                 device: torch.device) -> tuple[Callable[[], object], Callable[[], None] | None]:
    """(target, setup) for benchmark.pedantic: on CUDA both synchronise the device, elsewhere no setup."""
    if device.type != "cuda":
        return fn, None

    def target() -> object:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return target, lambda: torch.cuda.synchronize(device)


def time_once(target: Callable[[], object], setup: Callable[[], None] | None) -> float:
    """Seconds one call of `target` takes (after `setup`, untimed), by time.perf_counter, the timer
    pytest-benchmark uses by default: to choose the rounds, and for the interleaved baseline calls."""
    if setup is not None:
        setup()
    start = time.perf_counter()
    target()
    return time.perf_counter() - start


def interleaved(baseline: Callable[[], object], device: torch.device,
                setup: Callable[[], None] | None) -> tuple[Callable[[], None], list[float]]:
    """A benchmark.pedantic setup that first times one call of `baseline` (then runs `setup`),
    and the list it appends those seconds to (warm-up rounds included, first)."""
    target, baseline_setup = synchronized(baseline, device)
    seconds: list[float] = []

    def paired_setup() -> None:
        seconds.append(time_once(target, baseline_setup))
        if setup is not None:
            setup()

    return paired_setup, seconds
