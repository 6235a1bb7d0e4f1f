"""Scaling benchmarks: the training step of VGG08 / VGG38 / VGG98 BN+RC against batch size and
threads, native vs fused (vggbench/bench/scaling.py).

Group `scale-<model>-N<n>-T<threads>`; extra_info records the case; the fused benchmark's
speedup is over a native model of its own timed interleaved with its rounds, on the same threads.
"""

from __future__ import annotations

from vggbench.bench.model_cases import ModelBench
from vggbench.bench.scaling import torch_threads


def test_scale(scale, benchmark, measure, settings) -> None:
    case, impl = scale
    bench = ModelBench(case.step, settings.device)
    benchmark.extra_info.update(kind="scaling", model=case.model, label=case.step.label, n=case.n,
                                threads=case.threads, impl=impl, device=str(settings.device))
    with torch_threads(case.threads):
        baseline = None if impl == "native" else bench.step_fn(bench.model("native"), "native")
        measure(bench.step_fn(bench.model(impl), impl), group=case.group,
                policy=settings.scaling_policy, baseline=baseline)
