"""Helpers shared by the test modules (test modules never import each other)."""

from __future__ import annotations

import json
from pathlib import Path

TIMING = ("epoch_time_s", "images_per_s")  # metrics that differ between identical runs


def option(args: list[str], name: str) -> str:
    """The value following `name` in a command line."""
    return args[args.index(name) + 1]


def set_option(args: list[str], name: str, value: str) -> list[str]:
    """A copy of `args` with the value of option `name` replaced."""
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def metrics(run: Path) -> list[dict]:
    """The rows of a run directory's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock columns, for comparing runs."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
