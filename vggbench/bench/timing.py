"""How the suite times: rounds per group, the clock per device, interleaved baselines.

Every implementation in a benchmark group (same shape, dtype, layout and pass) is timed
with the same number of rounds, chosen from one call of the first implementation timed
in the group (native eager, which runs first). Speedups are paired measurements of the same
run: before each round of a non-baseline implementation, outside its timing, one call of the
baseline (native eager) is timed with the same clock, and the speedup is the median of those
baseline calls over the median of the rounds. Load from other processes and the machine's
drift then hit both sides alike, which two blocks timed one after the other do not guarantee.

On the CPU the clock is pytest-benchmark's default, time.perf_counter. On CUDA it is the GPU's
own (CudaEventClock, pytest-benchmark's timer there): before each round, untimed, the device is
synchronised (after an optional L2 flush: L2Flush); the round is the GPU time between a CUDA
event recorded before the call and one recorded after it, which the clock waits for. Every
group starts with warm-up rounds (the policy's, plus the call that chose the rounds), which
also take cuDNN's and the caching allocator's first-call costs out of the timings.
"""

from __future__ import annotations

import math
import time
import warnings
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


class CudaEventClock:
    """GPU time in seconds, as a pytest-benchmark timer: each reading records a CUDA event on the
    device's current stream, waits for it, and adds the GPU time since the previous reading's event
    (cudaEventElapsedTime, in float64 so long runs keep their resolution). The difference of two
    readings is the GPU time between their events: a round's kernels, not their launch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last: torch.cuda.Event | None = None
        self._seconds = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        if self._last is not None:
            self._seconds += self._last.elapsed_time(event) / 1e3  # elapsed_time is in ms
        self._last = event
        return self._seconds

    def __repr__(self) -> str:  # the timer's name in pytest-benchmark's JSON
        return f"CudaEventClock({self.device})"


class L2Flush:
    """Overwrites a buffer twice the size of the GPU's L2 cache, so that the next round reads its
    inputs from memory, not from a cache the previous round warmed (as Triton's do_bench does)."""

    def __init__(self, device: torch.device) -> None:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 2**27  # torch < 2.3
        self.buffer = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


@dataclass(frozen=True)
class DeviceTiming:
    """How rounds on a device are timed: `clock` (seconds) and `setup`, run untimed before each round."""

    clock: Callable[[], float]
    setup: Callable[[], None] | None

    @property
    def name(self) -> str:
        return "CUDA events" if isinstance(self.clock, CudaEventClock) else "time.perf_counter"


def device_timing(device: torch.device, l2_flush: bool = False) -> DeviceTiming:
    """time.perf_counter and no setup on the CPU; on CUDA, CudaEventClock and a setup that
    synchronises the device (after flushing the L2 cache with `l2_flush`)."""
    if device.type != "cuda":
        if l2_flush:
            raise ValueError(f"an L2 flush between rounds is for CUDA devices, not {device}")
        return DeviceTiming(time.perf_counter, None)
    flush = L2Flush(device) if l2_flush else None

    def setup() -> None:
        if flush is not None:
            flush()
        torch.cuda.synchronize(device)

    return DeviceTiming(CudaEventClock(device), setup)


def time_once(target: Callable[[], object], timing: DeviceTiming) -> float:
    """Seconds one call of `target` takes by `timing`'s clock (after its setup, untimed): to choose
    the rounds, and for the interleaved baseline calls."""
    if timing.setup is not None:
        timing.setup()
    start = timing.clock()
    target()
    return timing.clock() - start


def interleaved(baseline: Callable[[], object], timing: DeviceTiming) -> tuple[Callable[[], None], list[float]]:
    """A benchmark.pedantic setup that first times one call of `baseline` (then runs `timing`'s
    setup), and the list it appends those seconds to (warm-up rounds included, first)."""
    seconds: list[float] = []

    def paired_setup() -> None:
        seconds.append(time_once(baseline, timing))
        if timing.setup is not None:
            timing.setup()

    return paired_setup, seconds


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Host syncs one call of `fn` makes on CUDA: torch.cuda.set_sync_debug_mode("warn") warns at each
    (cudaStreamSynchronize, a device-to-host copy, .item(), a nonzero...)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not once per line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)
