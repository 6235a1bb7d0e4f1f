"""report.md from one run of the suite: machine, targets, timings, errors, memory, models, gradient flow.

Time ratios come from the speedups each benchmark recorded over its baseline (native eager
or native model) timed interleaved with its rounds (vggbench/bench/timing.py): a / b =
speedup(b) / speedup(a), the baseline's own speedup being 1. Byte ratios divide counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vggbench.bench.flow_cases import STAT_LABELS
from vggbench.bench.layer_cases import GRAPH_IMPLS, PASSES, UNITS
from vggbench.bench.model_cases import STEPS_PER_EPOCH
from vggbench.bench.op_counts import PHASES
from vggbench.bench.results import Record, Results
from vggbench.bench.scaling import SCALING_IMPLS
from vggbench.bench.surface_cases import SURFACE_GROUP

KEY_CASE = "conv-N100-H32-float32-channels_last"  # the study's 32->32 unit as it trains on the CPU
KEY_MODEL = "step-vgg38bnrc-N100-H32"
KEY_GPU_CASE = "res-N100-H32-bfloat16-channels_last"  # the 32->32 BN+residual unit as it trains on a GPU
KEY_GPU_MODEL = f"{KEY_MODEL}-bf16"


@dataclass(frozen=True)
class Target:
    """`impl` / `reference` of `metric` ("time", "median": medians of separately timed runs, or an
    extra_info key) in `group`, divided by `per`, must be <= `limit`; without a `reference`,
    `impl`'s extra_info value of `metric` itself (a count). A `group` with wildcards
    (fnmatch) names several groups: every one run must hold, and the worst counts. `machine`:
    the key of results.machine that must be true for the target to apply."""

    what: str
    group: str
    impl: str
    reference: str | None
    limit: float
    metric: str = "time"
    per: float = 1.0
    machine: str | None = None


TARGETS = (
    Target("training forward+backward, fused vs native eager", f"{KEY_CASE}-fwdbwd", "fused", "eager", 0.45),
    Target("training forward+backward, fused vs torch.compile", f"{KEY_CASE}-fwdbwd", "fused", "compile", 0.45),
    Target("training forward, fused vs native eager", f"{KEY_CASE}-trainfwd", "fused", "eager", 0.85),
    Target("every layer shape of the study at batch 100 (entry 3->32 and 32->32 units, with and without a residual, "
           "32x32 to 8x8, float32 and bfloat16, each pass), fused vs native eager", "*-N100-H*-channels_last-*",
           "fused", "eager", 0.9),
    Target("bfloat16 (autocast) training forward+backward, fused vs native bfloat16 eager, where ATen's bfloat16 "
           "convs have bfloat16 dot products (AVX512-BF16)", KEY_CASE.replace("float32", "bfloat16") + "-fwdbwd",
           "fused", "eager", 0.6, machine="native_bf16_dot_products"),
    Target("VGG38 BN+RC training step (batch 100), fused vs native", KEY_MODEL, "fused", "native", 0.5),
    Target("VGG38 BN+RC bytes saved for backward (batch 100), fused vs native", KEY_MODEL, "fused", "native",
           0.45, metric="saved_activation_bytes"),
    Target(f"landscape probe per epoch vs a VGG38 BN+RC training epoch ({STEPS_PER_EPOCH} steps of 100)",
           KEY_MODEL, "probe", "native", 0.05, per=STEPS_PER_EPOCH),
    Target("VGG38 BN+RC loss surface, 2 gloo ranks (1 thread each) vs 1 rank (1 thread)", SURFACE_GROUP,
           "2ranks", "1rank", 0.6, metric="median"),
)


# On one H100/H200 (`--device cuda`): batch 100, channels_last, bf16
GPU_TARGETS = (
    Target("VGG38 BN+RC training step (batch 100, bf16 autocast), fused vs native eager: >= 1.3x the images/s",
           KEY_GPU_MODEL, "fused", "native", round(1 / 1.3, 3)),
    Target("VGG38 BN+RC training step (batch 100, bf16 autocast), fused replayed from a CUDA graph vs native eager: "
           ">= 2x the images/s", KEY_GPU_MODEL, "fused+graph", "native", 0.5),
    Target("32->32 BN+residual unit (N=100, 32x32, bfloat16, channels_last), training forward+backward, fused vs "
           "native eager", f"{KEY_GPU_CASE}-fwdbwd", "fused", "eager", 0.8),
    Target("host syncs per VGG38 BN+RC training step (bf16 autocast), fused eager", KEY_GPU_MODEL, "fused", None, 0,
           metric="host_syncs_per_step"),
    Target("host syncs per VGG38 BN+RC training step (bf16 autocast), fused replayed from a CUDA graph",
           KEY_GPU_MODEL, "fused+graph", None, 0, metric="host_syncs_per_step"),
)


def ratio(a: Record | None, b: Record | None, metric: str = "time") -> float | None:
    """a / b of `metric`: time from the recorded speedups (see the module doc), else extra_info values."""
    if a is None or b is None:
        return None
    if metric == "median":
        return a.median_s / b.median_s
    if metric == "time":
        return b.info["speedup"] / a.info["speedup"]
    x, y = a.info.get(metric), b.info.get(metric)
    return x / y if x is not None and y else None


def _vs_baseline(record: Record | None) -> float | None:
    """Time over the baseline timed interleaved with it (the baseline is in every benchmark's pairs)."""
    return 1 / record.info["speedup"] if record else None


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "–"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _timed(record: Record | None, paired: bool = False) -> str:
    """Median ms, with the median of the baseline calls interleaved with it (`paired`)."""
    if record is None:
        return "–"
    return _ms(record.median_s) + (f" ({_ms(record.info['baseline_median_s'])})" if paired else "")


def _mb(n: int | None) -> str:
    return f"{n / 2**20:.2f}" if n is not None else "–"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _case_label(results: Results, case: str) -> str:
    info = next(r.info for r in results.layers if r.info["case"] == case)
    return (f"{UNITS[info['unit']][2]}, N={info['n']}, {info['size']}x{info['size']}, {info['dtype']}, "
            f"{info['layout']}")


def machine_section(results: Results) -> list[str]:
    """Machine and software (the CPU's instruction sets first), and the run's settings."""
    rows = [(key, str(value)) for key, value in results.machine.items()]
    rows += [(f"suite {key}", str(value)) for key, value in results.settings.items()]
    gpu = [f"GPU: {_gpu(results.machine)}.", "", _timing(results.settings), ""] if "gpu" in results.machine else []
    return ["## Machine and software", "", f"CPU: {_instruction_sets(results.machine)}.", "", *gpu,
            *_table(("", ""), rows)]


def _gpu(machine: dict) -> str:
    """The GPU in one line: what it is, its clocks (nvidia-smi: current / max MHz) and driver, CUDA and cuDNN."""
    def smi(field: str) -> str:
        return str(machine.get(f"nvidia_smi_{field}", "–"))

    clocks = (f"SM clock {smi('clocks_sm')} (max {smi('clocks_max_sm')}), memory clock {smi('clocks_mem')} "
              f"(max {smi('clocks_max_mem')}), power limit {smi('power_limit')}, {smi('pstate')}; driver "
              f"{smi('driver_version')}" if "nvidia_smi_driver_version" in machine else "nvidia-smi not available")
    return (f"{machine['gpu']} (compute capability {machine.get('gpu_capability', '?')}, "
            f"{machine.get('gpu_sms', '?')} SMs, {machine.get('gpu_l2_mib', '?')} MiB L2, "
            f"{machine.get('gpu_memory_gib', '?')} GiB); {clocks}; CUDA {machine.get('cuda', '?')}, "
            f"cuDNN {machine.get('cudnn', '?')}")


def _timing(settings: dict) -> str:
    """How the rounds were timed on the GPU."""
    flush = ("the L2 cache flushed before every round (a cold cache)" if settings.get("l2_flush")
             else "no L2 flush (inputs may be warm in L2 from the previous round)")
    return (f"Rounds timed with {settings.get('timer', '?')}: each after a device synchronise and warm-up "
            f"rounds, the GPU time between events recorded before and after the call; {flush}.")


def _target_value(results: Results, t: Target, group: str) -> float | None:
    """The target's figure in one group, or None if it was not measured there."""
    record = results.find(group, t.impl)
    if t.reference is None:
        value = record.info.get(t.metric) if record else None
    else:
        value = ratio(record, results.find(group, t.reference), t.metric)
    return value / t.per if value is not None else None


def target_lines(results: Results, targets: Iterable[Target]) -> list[str]:
    """One checklist line per target: PASS or FAIL with the figure of this run (a wildcard group:
    its worst group's), NOT MEASURED, or NOT APPLICABLE on this machine."""
    lines = []
    for t in targets:
        unit, needs = ("", t.impl) if t.reference is None else ("x", f"{t.impl} and {t.reference} in one run")
        if t.machine is not None and not results.machine.get(t.machine):
            lines.append(f"- [ ] NOT APPLICABLE here: {t.what} <= {t.limit}{unit} ({t.machine.replace('_', ' ')}: "
                         f"{results.machine.get(t.machine, 'not recorded')})")
            continue
        values = {group: value for group in results.groups(t.group)
                  if (value := _target_value(results, t, group)) is not None}
        if not values:
            lines.append(f"- [ ] NOT MEASURED: {t.what} <= {t.limit}{unit} (needs `{t.group}` {needs}: the full "
                         "suite)")
            continue
        worst = max(values, key=values.get)
        value, passed = values[worst], values[worst] <= t.limit
        where = f"`{worst}`" if len(values) == 1 else f"worst of {len(values)} groups: `{worst}`"
        lines.append(f"- [{'x' if passed else ' '}] {'PASS' if passed else 'FAIL'}: {t.what}: {value:.3g}{unit} "
                     f"{'<=' if passed else '>'} {t.limit}{unit} ({where}, {t.metric.replace('_', ' ')})")
    return lines


def gpu_targets_section(results: Results) -> list[str]:
    """The GPU's targets as a checklist with the figures of this run (a CUDA run only)."""
    if results.settings.get("device", "cpu") == "cpu":
        return []
    return ["## GPU targets", "",
            ("What the CUDA path promises on one H100/H200 (batch 100, channels_last, bf16), each checked against "
             "figures of this run: a ratio of times that must not exceed the limit (a speedup of at least x is a "
             "time ratio of at most 1/x), or a count of host syncs in one steady-state step "
             "(torch.cuda.set_sync_debug_mode)."), "", *target_lines(results, GPU_TARGETS), ""]


def targets_section(results: Results) -> list[str]:
    """The suite's CPU targets as a checklist with the ratios measured in this run."""
    device = results.settings.get("device", "cpu")
    lines = ["## Targets", "",
             ("What the fused op and the harness promise on a 2-core CPU (channels_last, training, the study's "
              "batch of 100; float32 unless said), each checked against figures of this run: a ratio of times or "
              "bytes that must not exceed the limit."), ""]
    if device != "cpu":
        lines += [f"Measured on {device}: the targets are the CPU's, shown for comparison.", ""]
    return [*lines, *target_lines(results, TARGETS), ""]


def layer_time_sections(results: Results) -> list[str]:
    """One table per pass: median times per implementation and their paired time ratios."""
    lines = ["## Layer timings", "",
             ("Median over each benchmark's rounds, ms; in parentheses the median of the eager calls timed "
              "interleaved with those rounds, which the ratios use (time ratios, < 1: faster than the reference; "
              "on a loaded machine the two eager figures differ). compile is native under "
              "torch.compile(dynamic=False); +graph (CUDA): eager's or fused's forward+backward captured in a CUDA "
              "graph and replayed."), ""]
    for pass_, label in PASSES.items():
        rows = []
        graphs = any(r.impl in GRAPH_IMPLS and r.info["pass"] == pass_ for r in results.layers)
        for case in results.cases():
            group = f"{case}-{pass_}"
            eager, compiled, fused = (results.find(group, impl) for impl in ("eager", "compile", "fused"))
            if eager or compiled or fused:
                row = (_case_label(results, case), _timed(eager), _timed(compiled, True), _timed(fused, True),
                       _fmt(_vs_baseline(fused)), _fmt(ratio(fused, compiled)), _fmt(_vs_baseline(compiled)))
                graphed = [results.find(group, impl) for impl in GRAPH_IMPLS]
                rows.append(row + (*(_timed(r, True) for r in graphed), _fmt(_vs_baseline(graphed[-1]))) * graphs)
        if rows:
            header = ("case", "eager ms", "compile ms", "fused ms", "fused/eager", "fused/compile", "compile/eager")
            header += ("eager+graph ms", "fused+graph ms", "fused+graph/eager") * graphs
            lines += [f"### {label}", "", *_table(header, rows)]
    return lines


def _errors(results: Results, case: str, impl: str, ref: str) -> dict[str, dict[str, float]]:
    """Errors of `impl` against `ref` ("eager" or "float64") over all passes run for `case`."""
    merged: dict[str, dict[str, float]] = {}
    for r in results.layers:
        if r.info["case"] == case and r.impl == impl:
            merged |= r.info["errors"][f"vs_{ref}"]
    return merged


def _worst(errors: dict[str, dict[str, float]], metric: str) -> str:
    if not errors:
        return "–"
    name = max(errors, key=lambda n: errors[n][metric])
    return f"{errors[name][metric]:.2e} ({name})"


def errors_section(results: Results) -> list[str]:
    """The fused op's errors against native eager and float64, per case (all passes run)."""
    rows = []
    for case in results.cases():
        fused = [r for r in results.layers if r.info["case"] == case and r.impl == "fused"]
        if not fused:
            continue
        tolerance = {k: v for r in fused for k, v in r.info["tolerance"].items()}
        vs64 = _errors(results, case, "fused", "float64")
        of_bound = {name: vs64[name][metric] / limit for name, (metric, limit) in tolerance.items()}
        worst = max(of_bound, key=of_bound.get)
        metric, limit = tolerance[worst]
        rows.append((
            _case_label(results, case), _worst(_errors(results, case, "fused", "eager"), "max_abs"),
            _worst(_errors(results, case, "fused", "eager"), "max_rel"),
            f"{worst} {metric} {vs64[worst][metric]:.2e} / {limit:.2e}",
            "yes" if all(r.info["within_tolerance"] for r in fused) else "**NO**",
            _worst(_errors(results, case, "eager", "float64"), "max_rel"),
            _worst(_errors(results, case, "compile", "eager"), "max_rel"),
        ))
    return ["## Numerical agreement", "",
            ("Outputs and gradients (input, weight, BN weight and bias, residual; eval output) after one training "
             "step and one eval forward from the same state. max_rel = max|a - b| / max|b| (relative to the "
             "tensor's scale, robust to entries near 0); norm_rel = ||a - b|| / ||b||. The tolerance is "
             "vggbench/tolerances.py's (the op tests' too), against native float64 on the same rounded inputs "
             "(worst tensor shown as "
             "error / bound); native eager's own error is shown for scale."), "",
            *_table(("case", "fused vs eager max abs", "fused vs eager max rel", "fused vs float64 (worst)",
                     "within tolerance", "eager vs float64 max rel", "compile vs eager max rel"), rows)]


def memory_section(results: Results) -> list[str]:
    """Bytes autograd keeps for backward besides inputs and parameters: layers and models."""
    def saved(records: list[Record], impl: str) -> int | None:
        return next((r.info["saved_activation_bytes"] for r in records
                     if r.impl == impl and "saved_activation_bytes" in r.info), None)

    layer_rows = []
    for case in results.cases():
        records = [r for r in results.layers if r.info["case"] == case]
        eager, compiled, fused = (saved(records, impl) for impl in ("eager", "compile", "fused"))
        if eager or compiled or fused:
            layer_rows.append((_case_label(results, case), _mb(eager), _mb(compiled), _mb(fused),
                               _fmt(fused / eager if fused is not None and eager else None)))
    model_rows = []
    for group in results.model_groups():
        records = [r for r in results.models if r.group == group]
        native, fused = saved(records, "native"), saved(records, "fused")
        model_rows.append((f"{records[0].info['label']}, batch {records[0].info['n']}", _mb(native), _mb(fused),
                           _fmt(fused / native if fused is not None and native else None)))
    lines = ["## Bytes saved for backward", "",
             ("After a training forward, each distinct storage counted once (vggbench.memory), besides the "
              "inputs and parameters; MiB."), ""]
    if layer_rows:
        lines += _table(("layer case", "eager", "compile", "fused", "fused/eager"), layer_rows)
    if model_rows:
        lines += _table(("model", "native", "fused", "fused/native"), model_rows)
    return lines


def models_section(results: Results) -> list[str]:
    """Training-step time and images/s per model, and the cost of gradient-flow recording."""
    rows, lines = [], []
    for group in results.model_groups():
        for r in (r for r in results.models if r.group == group):
            impl = {"gradflow": "native + gradient-flow recording", "probe": "landscape probe (not a step)",
                    "native+graph": "native, CUDA graph replay",
                    "fused+graph": "fused, CUDA graph replay"}.get(r.impl, r.impl)
            rows.append((f"{r.info['label']}, batch {r.info['n']}", impl, _timed(r, r.impl != "native"),
                         f"{r.info['n'] / r.median_s:.0f}" if r.impl != "probe" else "–", _fmt(_vs_baseline(r)),
                         str(r.info.get("host_syncs_per_step", "–"))))
            if r.impl == "gradflow":
                lines.append(f"Gradient-flow recording ({r.info['label']}, batch {r.info['n']}): "
                             f"{(_vs_baseline(r) - 1) * 100:+.1f}% step time over native (interleaved).")
            if r.impl == "probe":
                lines.append(f"Landscape probe ({r.info['label']}, batch {r.info['n']}, {r.info['multipliers']} "
                             f"forward+backward passes plus one): {_vs_baseline(r):.1f} native steps, "
                             f"{_vs_baseline(r) / STEPS_PER_EPOCH * 100:.2f}% of a {STEPS_PER_EPOCH}-step epoch.")
    if not rows:
        return []
    return ["## Model training step", "",
            ("forward + cross-entropy + backward + Adam step, float32 (or where named under bf16 autocast), "
             "channels_last, 32x32; median ms over the benchmark's rounds, in parentheses the median of the native "
             "steps timed interleaved with them, which time / native uses. CUDA graph replay (CUDA): the whole "
             "step (Adam with capturable=True) captured once and replayed, as `vggbench.train --cuda-graphs` runs "
             "it. Host syncs (CUDA): those one steady-state step makes (torch.cuda.set_sync_debug_mode)."), "",
            *_table(("model", "implementation", "step ms", "images/s", "time / native", "host syncs"), rows),
            *lines, ""]


def flow_section(results: Results) -> list[str]:
    """Per model and statistic: the largest relative differences fused/native/float64, where, and PASS/FAIL."""
    if not results.flows:
        return []
    rule = results.flows[0].info["rule"]
    lines = ["## Gradient-flow equivalence", "",
             (f"Native float32 trains {results.flows[0].info['steps']} Adam steps (lr 1e-3) on fixed batches; at every "
              "step fused float32 and native float64 (the truth) compute the gradient at native's parameters on the "
              "same batch, and a GradientFlowRecorder on each records mean|g|, max|g| and L2 per parameter tensor. "
              "Each entry is the largest |a - b| over layers and steps, each layer relative to its own scale (its "
              "largest float64 value over the steps; plain VGG38's first layers sit near 1e-18), with the layer and "
              "step where it peaks. Conv biases feeding a training-mode BatchNorm are left out (their exact gradient "
              f"is 0). Tolerance, derived from native's own error on this machine: {rule}."), ""]
    rows = []
    for r in results.flows:
        for stat, s in r.info["stats"].items():
            def peak(key: str, s: dict = s) -> str:
                d = s[key]
                return f"{d['max']:.2e} ({d['layer']}, step {d['step']})"
            rows.append((f"{r.info['label']}, batch {r.info['n']}, {r.info['size']}x{r.info['size']}",
                         STAT_LABELS[stat].replace("|", "\\|"), peak("fused_vs_native"), peak("native_vs_float64"),
                         peak("fused_vs_float64"), f"{s['tolerance']:.2e}", "PASS" if s["passed"] else "**FAIL**"))
    return [*lines, *_table(("model", "statistic", "fused vs native", "native vs float64 (truth)",
                             "fused vs float64", "tolerance", "result"), rows)]


def surface_section(results: Results) -> list[str]:
    """Seconds of a loss surface on 1 and 2 gloo ranks (1 thread each), and their ratio."""
    if not results.surfaces:
        return []
    rows = []
    for group in dict.fromkeys(r.group for r in results.surfaces):
        one, two = (results.find(group, impl) for impl in ("1rank", "2ranks"))
        info = (one or two).info
        rows.append((f"{info['label']}, {info['resolution']}x{info['resolution']} points, {info['samples']} images",
                     f"{one.median_s:.1f}" if one else "–", f"{two.median_s:.1f}" if two else "–",
                     _fmt(ratio(two, one, "median"))))
    return ["## Loss surface over ranks", "",
            ("`python -m vggbench.landscape surface` end to end (start-up, data, grid, gather, JSON, PNG), "
             "OMP_NUM_THREADS=1 per rank, one round each: on a shared machine the two runs may see different load. "
             "The grid's points split evenly over the ranks (vggbench/bench/surface_cases.py says why this grid)."),
            "", *_table(("surface", "1 rank s", "2 ranks s", "2 ranks / 1 rank"), rows)]


def _instruction_sets(machine: dict) -> str:
    """The CPU and what decides its kernels, in words (benchmark JSONs from before they were recorded: "–")."""
    return (f"{machine.get('cpu_model', '?')}: vector extensions {machine.get('cpu_vector_extensions', '–')}; "
            f"ATen CPU capability {machine.get('aten_cpu_capability', '–')}; "
            f"Winograd kernels {machine.get('winograd_isa', '–')}; bfloat16 dot products in ATen's bfloat16 "
            f"convs: {_yes_no(machine.get('native_bf16_dot_products'))}")


def _yes_no(flag: bool | None) -> str:
    return "–" if flag is None else "yes" if flag else "no"


def _ms_per_image(record: Record | None) -> str:
    return f"{record.median_s * 1e3 / record.info['n']:.2f}" if record else "–"


def scaling_section(results: Results) -> list[str]:
    """Training-step time per depth, batch size and thread count, native vs fused (scaling.png draws it)."""
    rows = []
    for group in dict.fromkeys(r.group for r in results.scaling):
        native, fused = (results.find(group, impl) for impl in SCALING_IMPLS)
        info = (native or fused).info
        rows.append((info["label"], str(info["n"]), str(info["threads"]), _timed(native), _timed(fused, True),
                     _fmt(_vs_baseline(fused)), _ms_per_image(native), _ms_per_image(fused)))
    if not rows:
        return []
    return ["## How cost grows", "",
            ("Training step (forward, cross-entropy, backward, Adam; float32, channels_last, 32x32) against depth "
             "(BN+RC at every depth), batch size and torch threads, on " + _instruction_sets(results.machine) +
             ". Median ms over the benchmark's rounds; in parentheses the median of the native steps timed "
             "interleaved with the fused rounds (same threads), which fused/native uses. Chart: scaling.png."), "",
            *_table(("model", "batch", "threads", "native ms", "fused ms", "fused/native", "native ms/image",
                     "fused ms/image"), rows)]


def op_counts_section(results: Results) -> list[str]:
    """Ops dispatched per unit and phase, native vs fused, totals and by op."""
    if not results.op_counts:
        return []
    info = results.op_counts[0].info
    totals = [(r.impl, *(str(sum(r.info["counts"][phase].values())) for phase in PHASES)) for r in results.op_counts]
    detail = [(r.impl, phase, ", ".join(f"{name} x{count}" for name, count in r.info["counts"][phase].items()) or "–")
              for r in results.op_counts for phase in PHASES]
    return ["## Ops dispatched per unit", "",
            (f"Ops dispatched per unit (forward / backward / eval), native vs fused: the 32->32 BN+residual unit "
             f"(N={info['n']}, {info['size']}x{info['size']}, float32, channels_last), counted with torch.profiler "
             "by vggbench/bench/op_counts.py: top-level ops that do work (not allocation, views or autograd's "
             "wrappers), the fused op's registered ops expanded into what they call, and each pass the extension "
             "records inside them (vggbench::cpu::..., vggbench::recompute_xhat) once. On a GPU each is a launch."),
            "", *_table(("implementation", *PHASES), totals),
            *_table(("implementation", "phase", "ops"), detail)]


def render(results: Results, charts: Iterable[str] = ()) -> str:
    """The whole report as Markdown; `charts`: PNG file names next to it."""
    mode = results.settings.get("mode", "?")
    lines = [
        "# vggbench benchmark report", "",
        (f"{results.datetime}, {mode} mode, device {results.settings.get('device', '?')}. "
         "All figures come from one pytest-benchmark session: within a group (one shape, dtype, layout and pass, "
         "or one model) the implementations run back to back with the same number of rounds, and before each "
         "round of compile or fused one call of native eager is timed, so every speedup pairs calls made "
         "seconds apart. Timings on a shared machine drift over hours; only these ratios compare."),
        "",
        *machine_section(results), *gpu_targets_section(results), *targets_section(results),
        *layer_time_sections(results),
        *errors_section(results), *memory_section(results), *models_section(results), *flow_section(results),
        *surface_section(results), *scaling_section(results), *op_counts_section(results),
    ]
    charts = list(charts)
    if charts:
        lines += ["## Charts", "", *(f"![{name}]({name})" for name in charts), ""]
    return "\n".join(lines)
