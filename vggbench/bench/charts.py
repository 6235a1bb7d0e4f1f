"""PNG charts of one run: speedup per layer shape, memory per model, images/s per model, gradient flow
native vs fused per layer, step time against batch size, threads and depth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from vggbench.bench.layer_cases import PASSES
from vggbench.bench.model_cases import MODEL_IMPLS
from vggbench.bench.results import Record, Results
from vggbench.checkpoint import atomic_save_figure

# layer implementations drawn against eager: (impl, legend)
SPEEDUP_SERIES = (("compile", "torch.compile"), ("fused", "fused"), ("eager+graph", "eager, CUDA graph"),
                  ("fused+graph", "fused, CUDA graph"))


def _save(fig: Figure, path: Path) -> None:
    """Lay out, write atomically (a reader never sees half a PNG) and free the figure."""
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], base: float = 0.0) -> None:
    """Grouped bars from `base`: one group per label, one bar per series (None values and
    series without any value left out)."""
    series = {name: values for name, values in series.items() if any(v is not None for v in values)}
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        points = [(j + (i - (len(series) - 1) / 2) * width, v) for j, v in enumerate(values) if v is not None]
        ax.bar([x for x, _ in points], [v - base for _, v in points], width, bottom=base, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=8)


def speedup_chart(results: Results, path: Path) -> bool:
    """Speedup over native eager (timed interleaved) of compile, fused and the CUDA-graph variants, per case,
    one panel per pass."""
    cases = results.cases()
    panels = [p for p in PASSES if any(r.info["pass"] == p for r in results.layers)]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.45 * len(cases) + 2), 3.2 * len(panels)),
                             squeeze=False)
    for ax, pass_ in zip(axes[:, 0], panels):
        series = {name: [r.info["speedup"] if (r := results.find(f"{case}-{pass_}", impl)) else None for case in cases]
                  for impl, name in SPEEDUP_SERIES}
        ax.set_yscale("log")
        _bars(ax, cases, series, base=1.0)  # bars from 1: up is faster than eager, down slower
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_ylabel("speedup over eager")
        ax.set_title(PASSES[pass_], fontsize=10)
    _save(fig, path)
    return True


def _model_chart(results: Results, path: Path, ylabel: str, value: Callable[[Record], float],
                 impls: tuple[str, ...] = MODEL_IMPLS) -> bool:
    """Grouped bars of `value` per model and implementation."""
    groups = results.model_groups()
    if not groups:
        return False
    labels = [next(r.info["label"] for r in results.models if r.group == g) for g in groups]
    series = {impl: [value(r) if (r := results.find(g, impl)) else None for g in groups] for impl in impls}
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    _bars(ax, labels, series)
    ax.set_ylabel(ylabel)
    _save(fig, path)
    return True


def memory_chart(results: Results, path: Path) -> bool:
    """MiB autograd saves for backward per model, per implementation."""
    return _model_chart(results, path, "saved for backward (MiB)", lambda r: r.info["saved_activation_bytes"] / 2**20,
                        impls=("native", "fused"))  # gradient-flow recording saves nothing more


def throughput_chart(results: Results, path: Path) -> bool:
    """Training images/s per model, per implementation."""
    return _model_chart(results, path, "training images/s", lambda r: r.info["n"] / r.median_s,
                        impls=("native", "fused", "gradflow", "native+graph", "fused+graph"))  # a probe is no step


def flow_chart(results: Results, path: Path) -> bool:
    """Mean |grad| per weight tensor (conv, linear), averaged over the steps: native as lines, fused as
    markers, float64 dashed; one panel per model, log scale."""
    if not results.flows:
        return False
    fig, axes = plt.subplots(1, len(results.flows), figsize=(4.2 * len(results.flows), 3.6), squeeze=False)
    for ax, record in zip(axes[0], results.flows):
        layers, per_layer = record.info["layers"], record.info["per_layer"]
        index = [i for i, layer in enumerate(layers)
                 if layer["param"] == "weight" and layer["kind"] in ("conv", "linear")]
        x = range(1, len(index) + 1)
        ax.plot(x, [per_layer["native"]["mean_abs"][i] for i in index], "-", color="C0", label="native")
        ax.plot(x, [per_layer["fused"]["mean_abs"][i] for i in index], "x", color="C3", label="fused")
        ax.plot(x, [per_layer["float64"]["mean_abs"][i] for i in index], ":", color="black", linewidth=0.8,
                label="float64")
        ax.set_yscale("log")
        ax.set_title(f"{record.info['label']} ({'PASS' if record.info['passed'] else 'FAIL'})", fontsize=10)
        ax.set_xlabel("weight tensor (forward order)")
        ax.set_ylabel(f"mean |grad| over {record.info['steps']} steps")
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


def scaling_chart(results: Results, path: Path) -> bool:
    """Training-step time vs batch size (log-log), a line per model and implementation (native dashed,
    fused solid, one colour per model), a panel per thread count; the CPU and its kernels' ISA in the title."""
    if not results.scaling:
        return False
    threads = sorted({r.info["threads"] for r in results.scaling})
    sizes = sorted({r.info["n"] for r in results.scaling})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.2), squeeze=False, sharey=True)
    for ax, count in zip(axes[0], threads):
        for colour, model in enumerate(dict.fromkeys(r.info["model"] for r in results.scaling)):
            for impl, style in (("native", "o--"), ("fused", "s-")):
                series = sorted((r for r in results.scaling if r.info["model"] == model and r.impl == impl
                                 and r.info["threads"] == count), key=lambda r: r.info["n"])
                if series:
                    ax.plot([r.info["n"] for r in series], [r.median_s * 1e3 for r in series], style,
                            color=f"C{colour}", label=f"{series[0].info['label']} {impl}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("batch size")
        ax.set_title(f"{count} thread{'s' * (count > 1)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("training step, ms")
    axes[0][-1].legend(fontsize=7)
    machine = results.machine
    fig.suptitle(f"{machine.get('cpu_model', '?')} (ATen {machine.get('aten_cpu_capability', '?')}, "
                 f"Winograd {machine.get('winograd_isa', '?')})", fontsize=9)
    _save(fig, path)
    return True


CHARTS = {"speedup.png": speedup_chart, "memory.png": memory_chart, "throughput.png": throughput_chart,
          "gradflow-equivalence.png": flow_chart, "scaling.png": scaling_chart}


def write_charts(results: Results, out_dir: Path) -> list[str]:
    """Write the charts there is data for into `out_dir`; return their file names."""
    return [name for name, chart in CHARTS.items() if chart(results, out_dir / name)]
