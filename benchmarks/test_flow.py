"""Gradient-flow equivalence: native vs fused vs float64 gradient statistics over 20 training steps.

Group `flow-<model>-N<n>-S<steps>`: one round of FlowBench.compare (vggbench/bench/flow_cases.py);
its time is the three gradient computations of every step, not a benchmark figure. extra_info
records per statistic the largest relative differences (fused vs native, native vs float64,
fused vs float64), where they peak, the tolerance derived from native's own distance to float64,
and the per-layer statistics averaged over the steps (for gradflow-equivalence.png). In quick mode
the tolerance is asserted.
"""

from __future__ import annotations

from vggbench.bench.flow_cases import FlowBench


def test_flow(flow, benchmark, settings) -> None:
    bench = FlowBench(flow, settings.device)
    benchmark.group = flow.name
    result = benchmark.pedantic(bench.compare, rounds=1, iterations=1)
    benchmark.extra_info.update(kind="flow", model=flow.model, label=flow.label, n=flow.n, size=flow.size,
                                steps=flow.steps, impl="native+fused+float64", device=str(settings.device), **result)
    if settings.quick:
        failed = {stat: f"fused vs float64 {s['fused_vs_float64']['max']:.3g} > {s['tolerance']:.3g}"
                  for stat, s in result["stats"].items() if not s["passed"]}
        assert not failed, f"{flow.label}: fused gradient flow off the truth beyond {result['rule']}: {failed}"
