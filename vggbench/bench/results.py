"""The benchmark JSON (pytest-benchmark's, with the suite's extra_info) read back as records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path


@dataclass(frozen=True)
class Record:
    """One benchmark: its group, median and IQR over its rounds (seconds), and its extra_info."""

    group: str
    name: str
    median_s: float
    iqr_s: float
    rounds: int
    info: dict

    @property
    def impl(self) -> str:
        return self.info["impl"]


@dataclass(frozen=True)
class Results:
    """A run of the suite: layer, model, gradient-flow, surface, scaling and op-count records in run
    order, the machine, the run's settings."""

    layers: list[Record]
    models: list[Record]
    flows: list[Record]
    surfaces: list[Record]
    scaling: list[Record]
    op_counts: list[Record]
    machine: dict
    settings: dict
    datetime: str

    def find(self, group: str, impl: str) -> Record | None:
        """The record of `impl` in `group`, or None if it was not run."""
        return next((r for r in self._timed() if r.group == group and r.impl == impl), None)

    def groups(self, pattern: str) -> list[str]:
        """The groups of layer, model, surface and scaling records that `pattern` (fnmatch, case-
        sensitive) matches, in run order, each once."""
        return [group for group in dict.fromkeys(r.group for r in self._timed()) if fnmatchcase(group, pattern)]

    def _timed(self) -> tuple[Record, ...]:
        """The layer, model, surface and scaling records: those with groups of implementations."""
        return (*self.layers, *self.models, *self.surfaces, *self.scaling)

    def cases(self) -> list[str]:
        """Layer case names in run order, each once."""
        return list(dict.fromkeys(r.info["case"] for r in self.layers))

    def model_groups(self) -> list[str]:
        """Model groups in run order, each once."""
        return list(dict.fromkeys(r.group for r in self.models))


def load(path: Path) -> Results:
    """Read a benchmark JSON written by `pytest benchmarks/ --benchmark-json PATH`."""
    data = json.loads(Path(path).read_text())
    records = [
        Record(group=b["group"], name=b["name"], median_s=b["stats"]["median"], iqr_s=b["stats"]["iqr"],
               rounds=b["stats"]["rounds"], info=b["extra_info"])
        for b in data["benchmarks"]
    ]
    return Results(
        layers=[r for r in records if r.info.get("kind") == "layer"],
        models=[r for r in records if r.info.get("kind") == "model"],
        flows=[r for r in records if r.info.get("kind") == "flow"],
        surfaces=[r for r in records if r.info.get("kind") == "surface"],
        scaling=[r for r in records if r.info.get("kind") == "scaling"],
        op_counts=[r for r in records if r.info.get("kind") == "op_counts"],
        machine=data["machine_info"].get("vggbench", {}), settings=data.get("vggbench", {}),
        datetime=data.get("datetime", ""),
    )
