"""Tabulate final results of run directories, like the study's Table 1.

Usage: ``python -m vggbench.report RUN_DIR... [--out FILE.md]``

Runs sharing a configuration (all config keys except the seed and
``NON_IDENTITY_KEYS``) form one row showing ``mean ± std`` over seeds. Runs trained with
``--landscape-every N`` add smoothness columns from their last probed epoch (landscape.json):
the effective beta-smoothness and the width of the loss band along the gradient
(Santurkar et al. 2018; smaller is smoother). Writes the Markdown table to ``--out``
(default ``report.md``) and the same data as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggbench.checkpoint import WriteError, atomic_write_text, check_writable_dir
from vggbench.config import RUNTIME_OPTIONS
from vggbench.landscape.probe import final_smoothness
from vggbench.run_dir import RUN_FACTS
from vggbench.runs import Run, RunError, load_run

# Config keys saying where or how a run was executed rather than what was trained
# (plus the facts train adds to config.json); runs differing only in these and the
# seed are repeats of one configuration.
NON_IDENTITY_KEYS = frozenset({"seed", *RUNTIME_OPTIONS, *RUN_FACTS})
# Reported values: (key, decimals). Losses get 3 decimals, accuracies (%) 2.
STATS = (("train_loss", 3), ("train_acc", 2), ("val_loss", 3), ("val_acc", 2), ("test_acc", 2))
HEADER = ("model", "lr", "#params", "seeds", "train loss", "train acc (%)", "val loss", "val acc (%)",
          "test acc (%)")
# Smoothness columns (landscape.json, last probed epoch): (key, header), 3 significant digits.
SMOOTHNESS = (("beta_smoothness", "β-smoothness"), ("loss_band", "loss band"))


@dataclass(frozen=True)
class Report:
    """Report rows (one per configuration, JSON-ready) and their Markdown rendering."""

    rows: list[dict[str, Any]]
    markdown: str


def configuration_identity(config: dict[str, Any]) -> str:
    """A canonical string equal for runs of one configuration, whatever their seed or machine."""
    return json.dumps({k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS}, sort_keys=True)


def summarise(runs: Sequence[Run]) -> dict[str, Any]:
    """One row for runs of one configuration: last-epoch train/val metrics and test accuracy.

    Each statistic holds the per-run ``values``, their ``mean`` and sample ``std``
    (None for fewer than two values); runs without ``test.json`` add no test value.
    """
    config = runs[0].config
    finals = [{**run.metrics[-1], "test_acc": run.test["test_acc"] if run.test else None} for run in runs]
    stats = {}
    for key, _ in STATS:
        values = [final[key] for final in finals if final[key] is not None]
        stats[key] = {
            "values": values,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
    smooth = [final_smoothness(run.path) for run in runs]
    for key, _ in SMOOTHNESS:
        values = [s[key] for s in smooth if s is not None]
        stats[key] = {"values": values, "mean": statistics.fmean(values) if values else None,
                      "std": statistics.stdev(values) if len(values) > 1 else None,
                      "epoch": max((s["epoch"] for s in smooth if s is not None), default=None)}
    return {
        "label": runs[0].label,
        "lr": config["lr"],
        "num_params": config["num_params"],
        "dataset": config.get("dataset"),
        "seeds": len(runs),
        "run_dirs": [str(run.path) for run in runs],
        "epochs": [final["epoch"] for final in finals],
        **stats,
    }


def build_report(run_dirs: Sequence[str | Path]) -> Report:
    """Load, group (in order of first appearance) and tabulate the given run directories.

    Raises:
        RunError: a run directory is missing or malformed.
    """
    groups: dict[str, list[Run]] = {}
    for run_dir in run_dirs:
        run = load_run(run_dir)
        groups.setdefault(configuration_identity(run.config), []).append(run)
    rows = [summarise(group) for group in groups.values()]
    return Report(rows, render_markdown(rows))


def render_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table (smoothness columns when any run has them), plus a warning line when any row
    used synthetic data."""
    smooth = [key for key, _ in SMOOTHNESS if any(row.get(key, {}).get("values") for row in rows)]
    header = [*HEADER, *(title for key, title in SMOOTHNESS if key in smooth)]
    lines = [_table_line(header), _table_line(["---"] + ["---:"] * (len(header) - 1))]
    for row in rows:
        cells = [row["label"], f"{row['lr']:g}", f"{row['num_params']:,}", str(row["seeds"])]
        cells += [_format_stat(row[key], decimals, row["seeds"]) for key, decimals in STATS]
        cells += [_format_stat(row[key], 0, row["seeds"], significant=True) for key in smooth]
        lines.append(_table_line(cells))
    synthetic = [row["label"] for row in rows if row["dataset"] == "synthetic"]
    if synthetic:
        lines += ["", (f"**Synthetic data**: {', '.join(synthetic)} trained on the synthetic stand-in dataset "
                       "(learnable class patterns), not CIFAR-100; they show the mechanism, not the study's figures.")]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: write the report and print the table. Bad run dirs exit with code 2."""
    parser = argparse.ArgumentParser(prog="python -m vggbench.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("report.md"),
                        help="Markdown file to write; the JSON goes beside it (default: report.md)")
    args = parser.parse_args(argv)
    try:
        check_writable_dir(args.out.parent, "--out")
        report = build_report(args.run_dirs)
    except (RunError, WriteError) as err:
        parser.error(str(err))
    atomic_write_text(args.out, report.markdown)
    json_path = args.out.with_suffix(".json")
    atomic_write_text(json_path, json.dumps({"rows": report.rows}, indent=2) + "\n")
    print(report.markdown)
    print(f"wrote {args.out} and {json_path}")
    return 0


def _format_stat(stat: dict[str, Any], decimals: int, seeds: int, significant: bool = False) -> str:
    """``mean ± std`` (or the single value), `decimals` places (or 3 significant digits); notes how many
    seeds contributed when not all did."""
    values = stat["values"]
    if not values:
        return "n/a"
    form = ".3g" if significant else f".{decimals}f"
    text = f"{stat['mean']:{form}}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:{form}}"
    if len(values) < seeds:
        text += f" ({len(values)}/{seeds} seeds)"
    return text


def _table_line(cells: Sequence[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
