"""pytest-benchmark suite of the fused op vs native PyTorch (eager and torch.compile).

    pytest benchmarks/ --benchmark-json out.json                   # full mode: real figures
    pytest benchmarks/ --bench-quick --benchmark-json out.json     # quick mode (CI): also correctness checks
    python -m vggbench.bench [--quick] --out DIR                   # the same, plus report.md and charts

Options: --bench-quick (or VGGBENCH_BENCH_QUICK=1), --bench-device cpu|cuda,
--bench-no-compile (leave torch.compile out), --bench-l2-flush (CUDA: a cold L2 cache for every
round). Timing (CUDA events on a GPU) and speedups: vggbench/bench/timing.py.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pytest
import torch

from vggbench.bench import machine
from vggbench.bench.flow_cases import flow_cases
from vggbench.bench.layer_cases import PASSES, LayerBench, LayerCase, layer_cases
from vggbench.bench.model_cases import model_cases
from vggbench.bench.scaling import SCALING_IMPLS, scaling_cases
from vggbench.bench.timing import (
    LAYER_POLICY,
    MODEL_POLICY,
    QUICK_POLICY,
    SCALING_POLICY,
    DeviceTiming,
    TimingPolicy,
    device_timing,
    interleaved,
    time_once,
)


@dataclass(frozen=True)
class Settings:
    """What this session runs: mode, device, whether torch.compile is benchmarked, how and how
    many rounds are timed."""

    quick: bool
    device: torch.device
    compile: bool
    l2_flush: bool
    timing: DeviceTiming
    layer_policy: TimingPolicy
    model_policy: TimingPolicy
    scaling_policy: TimingPolicy

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


SETTINGS = pytest.StashKey[Settings]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vggbench", "vggbench benchmark suite")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="quick mode: few small shapes, 3 rounds, errors asserted (also VGGBENCH_BENCH_QUICK=1)")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="device to benchmark on")
    group.addoption("--bench-no-compile", action="store_true", default=False,
                    help="leave out the torch.compile implementation")
    group.addoption("--bench-l2-flush", action="store_true", default=False,
                    help="CUDA: overwrite a buffer twice the L2 cache's size before every round (a cold cache)")


def _settings(config: pytest.Config) -> Settings:
    quick = config.getoption("--bench-quick") or os.environ.get("VGGBENCH_BENCH_QUICK", "") not in ("", "0")
    device, l2_flush = torch.device(config.getoption("--bench-device")), config.getoption("--bench-l2-flush")
    return Settings(
        quick=quick, device=device, compile=not config.getoption("--bench-no-compile"),
        l2_flush=l2_flush, timing=device_timing(device, l2_flush),
        layer_policy=QUICK_POLICY if quick else LAYER_POLICY, model_policy=QUICK_POLICY if quick else MODEL_POLICY,
        scaling_policy=QUICK_POLICY if quick else SCALING_POLICY,
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--bench-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: CUDA is not available on this machine; "
                                "use --bench-device cpu")
    if config.getoption("--bench-l2-flush") and config.getoption("--bench-device") != "cuda":
        raise pytest.UsageError("--bench-l2-flush flushes a GPU's L2 cache: use it with --bench-device cuda")
    settings = _settings(config)
    if settings.device.type == "cuda":
        # float32 means IEEE float32 for every implementation (tests/test_ops.py does the same)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time eager as "compile"
    config.stash[SETTINGS] = settings


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Layer benchmarks ordered case -> pass -> implementation, models and scaling case ->
    implementation: the baseline of each group (eager / native) runs first and sets the group's
    rounds. Flow cases: one per model."""
    settings = metafunc.config.stash[SETTINGS]
    if "layer" in metafunc.fixturenames:
        graphs = settings.device.type == "cuda"  # the CUDA-graph variants
        params = [(case, pass_, impl) for case in layer_cases(settings.quick, settings.compile, graphs)
                  for pass_ in PASSES for impl in case.impls(pass_)]
        metafunc.parametrize("layer", params, ids=[f"{case.group(pass_)}-{impl}" for case, pass_, impl in params])
    if "step" in metafunc.fixturenames:
        params = [(case, impl) for case in model_cases(settings.quick, settings.device.type == "cuda")
                  for impl in case.impls]
        metafunc.parametrize("step", params, ids=[f"{case.group}-{impl}" for case, impl in params])
    if "scale" in metafunc.fixturenames:
        params = [(case, impl) for case in scaling_cases(settings.quick) for impl in SCALING_IMPLS]
        metafunc.parametrize("scale", params, ids=[f"{case.group}-{impl}" for case, impl in params])
    if "flow" in metafunc.fixturenames:
        cases = flow_cases(settings.quick)
        metafunc.parametrize("flow", cases, ids=[case.name for case in cases])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On CUDA, benchmarks timed by `measure` use the GPU's clock (pytest-benchmark's timer option)."""
    settings = config.stash[SETTINGS]
    if settings.device.type != "cuda":
        return
    for item in items:
        if "measure" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=settings.timing.clock))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["vggbench"] = machine.collect(config.stash[SETTINGS].device)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    settings = config.stash[SETTINGS]
    output_json["vggbench"] = {
        "mode": settings.mode, "device": str(settings.device), "compile": settings.compile,
        "timer": settings.timing.name, "l2_flush": settings.l2_flush,
        "layer_policy": asdict(settings.layer_policy), "model_policy": asdict(settings.model_policy),
        "scaling_policy": asdict(settings.scaling_policy),
    }


@pytest.fixture(scope="session")
def settings(pytestconfig: pytest.Config) -> Settings:
    return pytestconfig.stash[SETTINGS]


@pytest.fixture(scope="session")
def group_rounds() -> dict[str, int]:
    """Rounds per benchmark group, set by the group's first benchmark."""
    return {}


@pytest.fixture(scope="session")
def layer_bench(settings: Settings) -> Callable[[LayerCase, float], LayerBench]:
    """LayerBench of a case, kept while consecutive benchmarks use it (one case in memory at a time).

    A new case starts from a reset torch.compile state: every case compiles the same
    ConvNormAct.forward for another shape, and past dynamo's recompile limit (8) it would
    fall back to eager (made an error in pytest_configure, not a silent eager timing)."""
    current: dict[LayerCase, LayerBench] = {}

    def get(case: LayerCase, kink: float) -> LayerBench:
        if case not in current:
            current.clear()
            torch._dynamo.reset()
            current[case] = LayerBench(case, settings.device, kink)
        return current[case]

    return get


@pytest.fixture
def measure(benchmark, settings: Settings, group_rounds: dict[str, int]) -> Callable[..., None]:
    """measure(fn, group=, policy=, baseline=): time `fn` with benchmark.pedantic using the
    group's rounds. With a `baseline` function (native), one call of it is timed before each
    round and extra_info records its median and the speedup = that median / fn's median
    (vggbench/bench/timing.py); without, `fn` is the baseline (speedup 1)."""

    def run(fn: Callable[[], object], *, group: str, policy: TimingPolicy,
            baseline: Callable[[], object] | None) -> None:
        benchmark.group = group
        setup, paired = settings.timing.setup, []
        if group not in group_rounds:
            group_rounds[group] = policy.rounds_for(time_once(fn, settings.timing))
        if baseline is not None:
            setup, paired = interleaved(baseline, settings.timing)
        benchmark.pedantic(fn, setup=setup, rounds=group_rounds[group], warmup_rounds=policy.warmup_rounds)
        if not benchmark.stats:  # --benchmark-disable: ran once, nothing timed
            return
        median = benchmark.stats.stats.median
        base = statistics.median(paired[policy.warmup_rounds:]) if paired else median
        benchmark.extra_info.update(baseline_median_s=base, speedup=base / median)

    return run
