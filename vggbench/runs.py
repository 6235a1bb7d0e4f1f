"""Read a run directory written by ``vggbench.train`` (shared by plot and report).

A run directory holds ``config.json``, ``metrics.jsonl``, optionally ``gradflow.json``
and, once the run finished, ``test.json``. Anything missing or malformed raises
:class:`RunError` with a message naming the file and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
GRADFLOW_FILE = "gradflow.json"
TEST_FILE = "test.json"

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
GRADFLOW_EPOCH_KEYS = ("epoch", "mean_abs", "diagnosis")


class RunError(ValueError):
    """A run directory is missing, incomplete or holds malformed files."""


@dataclass(frozen=True)
class Run:
    """The contents of one run directory."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    gradflow: dict[str, Any] | None
    test: dict[str, Any] | None

    @property
    def label(self) -> str:
        """The model's display label, e.g. ``"VGG38 BN+RC"`` (the dir name if unset)."""
        return str(self.config.get("label") or self.path.name)

    @property
    def synthetic(self) -> bool:
        """Whether the run trained on synthetic data instead of CIFAR-100."""
        return self.config.get("dataset") == "synthetic"

    @property
    def title(self) -> str:
        """The label, flagged when the data was synthetic."""
        return f"{self.label} (synthetic data)" if self.synthetic else self.label

    def require_gradflow(self) -> dict[str, Any]:
        """Return the gradient-flow record, or raise if the run has none with epochs."""
        path = self.path / GRADFLOW_FILE
        if self.gradflow is None:
            raise RunError(f"{path}: not found; expected the gradient-flow record written by vggbench.train")
        if not self.gradflow["epochs"]:
            raise RunError(f"{path}: no epochs recorded yet; expected at least one completed epoch")
        return self.gradflow


def load_run(run_dir: str | Path) -> Run:
    """Load one run directory; ``gradflow`` and ``test`` are None when their file is absent.

    Raises:
        RunError: the directory or a required file is missing, or a file is malformed.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory; expected a run directory written by vggbench.train")
    config = read_json(path / CONFIG_FILE, "the JSON training config")
    metrics = _read_metrics(path / METRICS_FILE)
    gradflow_path = path / GRADFLOW_FILE
    gradflow = _read_gradflow(gradflow_path) if gradflow_path.exists() else None
    test_path = path / TEST_FILE
    test = read_json(test_path, "the test result") if test_path.exists() else None
    if test is not None and "test_acc" not in test:
        raise RunError(f"{test_path}: expected a 'test_acc' key")
    return Run(path, config, metrics, gradflow, test)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a file holding one JSON object."""
    if not path.is_file():
        raise RunError(f"{path}: not found; expected {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: malformed JSON ({err}); expected {what}") from err
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object holding {what}")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl``: one JSON object per completed epoch."""
    if not path.is_file():
        raise RunError(f"{path}: not found; expected one JSON object per completed epoch")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f"{path}, line {number}: malformed JSON ({err})") from err
        if not isinstance(row, dict) or not all(key in row for key in METRIC_KEYS):
            raise RunError(f"{path}, line {number}: expected an object with keys {', '.join(METRIC_KEYS)}")
        rows.append(row)
    if not rows:
        raise RunError(f"{path}: empty; expected at least one completed epoch")
    return rows


def _read_gradflow(path: Path) -> dict[str, Any]:
    """Parse ``gradflow.json`` and check each epoch has one value per layer."""
    data = read_json(path, "the gradient-flow record")
    layers, epochs = data.get("layers"), data.get("epochs")
    if not isinstance(layers, list) or not isinstance(epochs, list):
        raise RunError(f"{path}: expected 'layers' and 'epochs' lists")
    for epoch in epochs:
        if not all(key in epoch for key in GRADFLOW_EPOCH_KEYS) or len(epoch["mean_abs"]) != len(layers):
            raise RunError(
                f"{path}: expected every epoch to hold {', '.join(GRADFLOW_EPOCH_KEYS)} "
                f"with one mean_abs value per layer ({len(layers)})"
            )
    return data
