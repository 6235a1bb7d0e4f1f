"""Plot gradient flow and learning curves of run directories.

Usage: ``python -m vggbench.plot RUN_DIR... [--out DIR] [--all-params]``

Writes ``gradflow.png`` and ``curves.png`` into every run directory and, given several
runs, ``compare.png`` and ``compare.json`` (the plotted data) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vggbench.checkpoint import WriteError, atomic_save_figure, atomic_write_text, check_writable_dir
from vggbench.runs import Run, RunError, load_run

DPI = 120
# Zero gradients (a fully vanished layer) cannot sit on a log axis; they are drawn here.
GRAD_FLOOR = 1e-30
GRAD_YLABEL = f"mean |grad| (log; zeros clipped to {GRAD_FLOOR:g})"
# Light (early epochs) to dark (late epochs); the palest end of Blues is invisible on white.
EPOCH_CMAP = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.3, 1.0, 256)))


def plot_gradient_flow(run_dir: str | Path, all_params: bool = False) -> Path:
    """Draw mean |grad| per layer (forward order, log y), one line per epoch.

    Only weight tensors are drawn unless ``all_params`` also asks for biases.
    Returns the path of ``gradflow.png`` written next to ``gradflow.json``.
    """
    run = load_run(run_dir)
    gradflow = run.require_gradflow()
    index = _layer_indices(gradflow, all_params)
    layers = [gradflow["layers"][i] for i in index]
    epochs = gradflow["epochs"]
    numbers = [epoch["epoch"] for epoch in epochs]
    norm = Normalize(vmin=numbers[0], vmax=max(numbers[-1], numbers[0] + 1))

    fig = Figure(figsize=(min(24.0, max(8.0, 0.18 * len(layers))), 5.5))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    for epoch in epochs:
        ax.plot(x, _clipped(epoch["mean_abs"], index), color=EPOCH_CMAP(norm(epoch["epoch"])), lw=1.2)
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=EPOCH_CMAP), ax=ax, label="epoch")
    colorbar.locator = MaxNLocator(integer=True)  # epochs are whole numbers
    colorbar.update_ticks()
    ax.set_yscale("log")
    ax.set_ylabel(GRAD_YLABEL)
    ax.set_xlabel("layer (forward order)")
    ax.set_xticks(x, [_short_name(layer, all_params) for layer in layers], rotation=90,
                  fontsize=6 if len(layers) > 40 else 8)
    ax.grid(True, which="major", alpha=0.3)
    last = epochs[-1]
    ax.set_title(f"{run.title}: gradient flow, epoch {last['epoch']} diagnosis: {last['diagnosis']['status']}")
    return _save(fig, run.path / "gradflow.png")


def plot_curves(run_dir: str | Path) -> Path:
    """Draw train/val loss and accuracy (%) per epoch; returns ``curves.png`` next to ``metrics.jsonl``."""
    run = load_run(run_dir)
    epochs = [row["epoch"] for row in run.metrics]
    fig = Figure(figsize=(11, 4.5))
    for ax, metric, ylabel in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy (%)")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in run.metrics], marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(run.title)
    return _save(fig, run.path / "curves.png")


def comparison_data(runs: Sequence[Run]) -> dict[str, Any]:
    """The data ``compare.png`` draws: val curves and last-epoch weight gradient flow per run.

    Layer positions are normalised to 0..1 so networks of different depth share an axis;
    gradients are clipped to ``GRAD_FLOOR`` as drawn.
    """
    entries = []
    for run, name in zip(runs, _legend_names(runs)):
        gradflow = run.require_gradflow()
        index = _layer_indices(gradflow, all_params=False)
        last = gradflow["epochs"][-1]
        entries.append({
            "run_dir": str(run.path),
            "label": name,
            "epoch": [row["epoch"] for row in run.metrics],
            "val_loss": [row["val_loss"] for row in run.metrics],
            "val_acc": [row["val_acc"] for row in run.metrics],
            "gradflow": {
                "epoch": last["epoch"],
                "status": last["diagnosis"]["status"],
                "layers": [gradflow["layers"][i]["name"] for i in index],
                "position": [i / max(len(index) - 1, 1) for i in range(len(index))],
                "mean_abs": _clipped(last["mean_abs"], index).tolist(),
            },
        })
    return {"grad_floor": GRAD_FLOOR, "runs": entries}


def plot_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path = ".") -> Path:
    """Compare runs: val loss, val accuracy and last-epoch gradient flow.

    Writes ``compare.png`` and ``compare.json`` (exactly the plotted data) into
    ``out_dir`` and returns the PNG's path.
    """
    data = comparison_data([load_run(run_dir) for run_dir in run_dirs])
    fig = Figure(figsize=(16, 4.8))
    loss_ax, acc_ax, grad_ax = fig.subplots(1, 3)
    for entry in data["runs"]:
        loss_ax.plot(entry["epoch"], entry["val_loss"], marker=".", label=entry["label"])
        acc_ax.plot(entry["epoch"], entry["val_acc"], marker=".", label=entry["label"])
        flow = entry["gradflow"]
        grad_ax.plot(flow["position"], flow["mean_abs"], marker=".",
                     label=f"{entry['label']} (epoch {flow['epoch']}: {flow['status']})")
    for ax, ylabel in ((loss_ax, "val loss"), (acc_ax, "val accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
    grad_ax.set_yscale("log")
    grad_ax.set_xlabel("layer position (0 = input, 1 = output)")
    grad_ax.set_ylabel(GRAD_YLABEL)
    grad_ax.set_title("last-epoch gradient flow (weights)")
    for ax in (loss_ax, acc_ax, grad_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(data, indent=2) + "\n")
    return _save(fig, out / "compare.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints the paths written. Bad run dirs exit with code 2."""
    parser = argparse.ArgumentParser(prog="python -m vggbench.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("."), help="where compare.png/.json go (default: .)")
    parser.add_argument("--all-params", action="store_true", help="also draw bias gradients in gradflow.png")
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) > 1:
            check_writable_dir(args.out, "--out")
        paths = []
        for run_dir in args.run_dirs:
            paths += [plot_gradient_flow(run_dir, args.all_params), plot_curves(run_dir)]
        if len(args.run_dirs) > 1:
            paths += [plot_comparison(args.run_dirs, args.out), args.out / "compare.json"]
    except (RunError, WriteError) as err:
        parser.error(str(err))
    for path in paths:
        print(path)
    return 0


def _layer_indices(gradflow: dict[str, Any], all_params: bool) -> list[int]:
    """Positions of the drawn tensors in ``gradflow["layers"]``: weights, or every tensor."""
    return [i for i, layer in enumerate(gradflow["layers"]) if all_params or layer["param"] == "weight"]


def _clipped(values: Sequence[float], index: Sequence[int]) -> np.ndarray:
    """The selected values, with zeros raised to ``GRAD_FLOOR`` for the log axis."""
    return np.maximum(np.asarray(values, dtype=float)[list(index)], GRAD_FLOOR)


def _short_name(layer: dict[str, Any], all_params: bool) -> str:
    """Tick label: the tensor name without its ``.weight``/``.bias`` suffix when only weights are drawn."""
    name = layer["name"]
    suffix = f".{layer['param']}"
    return name[: -len(suffix)] if not all_params and name.endswith(suffix) else name


def _legend_names(runs: Sequence[Run]) -> list[str]:
    """Run titles, with the directory name added where several runs share one."""
    labels = [run.title for run in runs]
    return [f"{label} [{run.path.name}]" if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at the module's DPI and return its path."""
    return atomic_save_figure(fig, path, dpi=DPI, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
