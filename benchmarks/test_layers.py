"""Layer-level benchmarks: each of the study's unit shapes x pass x implementation.

Group `<unit>-N<n>-H<size>-<dtype>-<layout>-<pass>` holds eager, compile and fused side by
side (vggbench/bench/layer_cases.py). extra_info records the case, the errors of outputs and
gradients against native eager and against float64 native (max_abs, max_rel = max|a-b| /
max|b|, norm_rel = ||a-b|| / ||b||), the float64 tolerance and whether it holds, the bytes
saved for backward (training passes), and the speedup over eager (timed interleaved with its rounds).
In quick mode the fused op's errors are asserted against the tolerances of vggbench/tolerances.py
(the op tests use them too).
"""

from __future__ import annotations

from vggbench.bench.layer_cases import DTYPES, UNITS
from vggbench.tolerances import TOLERANCES, Tolerance


def bound(tol: Tolerance, tensor: str) -> tuple[str, float]:
    """(metric, bound) of `tensor` against float64, from vggbench/tolerances.py: its
    elementwise |a - e| <= atol * max|e| + rtol * |e| implies max_rel <= atol + rtol; gradients
    use its relative-norm bound where it has one (bfloat16)."""
    if tensor.startswith("grad_") and tol.grad is not None:
        return "norm_rel", tol.grad
    return "max_rel", tol.atol + tol.rtol


def test_layer(layer, benchmark, layer_bench, measure, settings) -> None:
    case, pass_, impl = layer
    tol = TOLERANCES[DTYPES[case.dtype]]
    bench = layer_bench(case, tol.kink)
    errors = bench.errors(impl, pass_)
    bounds = {name: bound(tol, name) for name in errors["vs_float64"]}
    exceeded = {name: f"{metric} {errors['vs_float64'][name][metric]:.3g} > {limit:.3g}"
                for name, (metric, limit) in bounds.items() if not errors["vs_float64"][name][metric] <= limit}
    info = benchmark.extra_info
    info.update({"kind": "layer", "case": case.name, "unit": case.unit, "in_channels": UNITS[case.unit][0],
                 "n": case.n, "size": case.size, "dtype": case.dtype, "layout": case.layout, "pass": pass_,
                 "impl": impl, "device": str(settings.device), "errors": errors, "tolerance": bounds,
                 "within_tolerance": not exceeded})
    if pass_ != "evalfwd":
        saved = bench.saved_bytes(impl)
        info.update(saved_bytes=saved.total, saved_activation_bytes=saved.activations)
    measure(bench.pass_fn(impl, pass_), group=case.group(pass_), policy=settings.layer_policy,
            baseline=None if impl == "eager" else bench.pass_fn("eager", pass_))
    if settings.quick and impl == "fused":
        assert not exceeded, f"fused op off native float64 beyond vggbench/tolerances.py's tolerance: {exceeded}"

