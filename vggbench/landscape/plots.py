"""Plots of the landscape measures: per run landscape.png, a comparison across runs, surfaces.

landscape.png (next to landscape.json): per probed epoch the loss-variation band and the
gradient-predictiveness band (min..max over the step multipliers, shaded) and the effective
beta-smoothness, the three panels of Santurkar et al.'s Fig. 4. landscape-compare.png: the
same for several runs, one colour each. surface PNG (next to its JSON): the 1-D loss curve
or the 2-D contour of a surface.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend

from vggbench.checkpoint import atomic_save_figure
from vggbench.landscape.probe import LANDSCAPE_FILE
from vggbench.runs import RunError, load_run, read_json

PANELS = (("loss_band", "loss along the gradient", "linear"),
          ("predictiveness_band", "||grad L(θ) - grad L(θ - lr·s·g)||", "log"),
          ("beta_smoothness", "effective β-smoothness", "log"))


def read_landscape(run_dir: str | Path) -> dict:
    """landscape.json of a run directory; RunError when absent or without probed epochs."""
    path = Path(run_dir) / LANDSCAPE_FILE
    data = read_json(path, "the landscape probe's record: train with --landscape-every N to record it")
    if not data.get("epochs"):
        raise RunError(f"{path}: no probed epochs yet; the probe runs every {data.get('every', '?')} epoch(s)")
    return data


def _draw(axes, data: dict, colour: str, name: str) -> None:
    epochs = [e["epoch"] for e in data["epochs"]]
    for ax, (key, title, scale) in zip(axes, PANELS):
        values = [e[key] for e in data["epochs"]]
        if isinstance(values[0], list):
            ax.fill_between(epochs, [v[0] for v in values], [v[1] for v in values], color=colour, alpha=0.3)
            ax.plot(epochs, [v[1] for v in values], color=colour, linewidth=0.8, label=name)
        else:
            ax.plot(epochs, values, "o-", color=colour, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if all(v > 0 for v in ([x for pair in values for x in pair] if isinstance(values[0], list) else values)):
            ax.set_yscale(scale)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> Path:
    """landscape.png in the run directory."""
    run = load_run(run_dir)
    data = read_landscape(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    _draw(axes, data, "C0", run.label)
    fig.suptitle(f"{run.title}: landscape along training (probe batch {data['batch_size']}, "
                 f"s in {data['epochs'][0]['multipliers']})", fontsize=10)
    return _save(fig, Path(run_dir) / "landscape.png")


def plot_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """landscape-compare.png in `out_dir`: the bands of every run (with a landscape.json) over training."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    synthetic = False
    for i, run_dir in enumerate(run_dirs):
        run = load_run(run_dir)
        synthetic |= run.synthetic
        _draw(axes, read_landscape(run_dir), f"C{i}", run.label)
    axes[0].legend(fontsize=8)
    fig.suptitle("loss landscape along training" + (" (synthetic data)" if synthetic else ""), fontsize=10)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _save(fig, out / "landscape-compare.png")


def plot_surface(json_path: str | Path) -> Path:
    """The PNG of a surface JSON written by `python -m vggbench.landscape surface`, beside it."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if data["dims"] == 1:
        ax.plot(data["axis"], data["loss"], "o-", markersize=3)
        ax.set_xlabel("α (filter-normalised direction)")
        ax.set_ylabel(f"{data['split']} loss")
    else:
        contour = ax.contour(data["axis"], data["axis"], data["loss_grid"], levels=20, cmap="viridis")
        ax.clabel(contour, fontsize=6)
        ax.plot([0], [0], "r+")
        ax.set_xlabel("α")
        ax.set_ylabel("β")
    ax.set_title(f"{data['label']}, {data['split']} loss, {data['samples']} images"
                 + (" (synthetic data)" if data.get("dataset") == "synthetic" else ""), fontsize=9)
    return _save(fig, json_path.with_suffix(".png"))
