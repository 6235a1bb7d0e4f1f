"""Model-level benchmarks: a training step of VGG08, VGG38 BN and VGG38 BN+RC, and of VGG38 BN+RC
under bf16 autocast, native vs fused, and VGG38 BN+RC with gradient-flow recording and one landscape
probe (vggbench/bench/model_cases.py); on CUDA every step also replayed from a CUDA graph.

Group `step-<model>-N<n>-H<size>[-bf16]`; extra_info records the case and the bytes autograd keeps
for backward after a training forward, and the speedup over native (timed interleaved with
its rounds, on a native model of its own); images/s = n / median step time. On CUDA, the host
syncs of one step after the timed ones (host_syncs_per_step; not for the probe, which reads its
figures back).
"""

from __future__ import annotations

from vggbench.bench.model_cases import ModelBench
from vggbench.bench.timing import count_host_syncs
from vggbench.landscape.probe import MULTIPLIERS


def test_step(step, benchmark, measure, settings) -> None:
    case, impl = step
    bench = ModelBench(case, settings.device)
    model = bench.model(impl)
    saved = bench.saved_bytes(model)
    fn = bench.step_fn(model, impl)
    benchmark.extra_info.update(kind="model", model=case.model, label=case.label, n=case.n, size=case.size,
                                autocast=case.autocast, impl=impl, device=str(settings.device), saved_bytes=saved.total,
                                saved_activation_bytes=saved.activations)
    if impl == "probe":
        benchmark.extra_info["multipliers"] = len(MULTIPLIERS)
    baseline = None if impl == "native" else bench.step_fn(bench.model("native"), "native")
    measure(fn, group=case.group, policy=settings.model_policy, baseline=baseline)
    if settings.device.type == "cuda" and impl != "probe":
        benchmark.extra_info["host_syncs_per_step"] = count_host_syncs(fn)
