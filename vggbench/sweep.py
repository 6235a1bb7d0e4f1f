"""Sweep files: a grid of trainings, e.g. the study's table (variants x learning rates x seeds).

A sweep file is YAML (or JSON, for a ``.json`` name)::

    out_dir: runs/study          # optional (default: runs); --out-dir on the command line wins
    base:                        # optional: vggbench.train options every run gets
      model: vgg38
      epochs: 100
    grid:                        # required: every combination of these lists is one run
      variant: [plain, bn, rc, bn_rc]
      lr: [0.001, 0.01]
      seed: [0, 1, 2]

Keys of ``base`` and ``grid`` are vggbench.train options without the leading dashes
(``batch_size`` or ``batch-size``); values are numbers, strings or booleans (true gives
``--flag``, false ``--no-flag``). Training options given on the command line apply to every
run and win over ``base``; they may not repeat a ``grid`` key. Each run gets its own
directory under ``out_dir``, named like vggbench.train's default run directory,
``<model>-<variant>-lr<lr>-seed<seed>``, plus ``-<key><value>`` for each other grid key, so
``python -m vggbench.report <out_dir>/*/`` tabulates them with mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vggbench.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    explicit_options,
    flag,
    option_argv,
)

SWEEP_KEYS = ("out_dir", "base", "grid")
DEFAULT_OUT_DIR = "runs"
# Grid keys already part of the default run directory name.
NAMED_KEYS = ("model", "variant", "lr", "seed")
# Options a sweep decides itself: every run's directory, and continuing runs that have checkpoints.
RESERVED_KEYS = ("out_dir", "resume")
_FIELDS = {f.name: f for f in fields(TrainConfig)}


class SweepError(ValueError):
    """A sweep file that cannot be read or describes impossible runs; the message names the file."""


@dataclass(frozen=True)
class SweepRun:
    """One grid point: its run directory and its complete vggbench.train command line."""

    run_dir: Path
    train_argv: list[str]


def load_sweep(path: str | Path, train_argv: Sequence[str] = ()) -> list[SweepRun]:
    """The runs a sweep file describes, in grid order (the last grid key varies fastest).

    `train_argv` holds the training options of the command line; they apply to every run
    (an --out-dir among them is the sweep's output directory). Every run's options are
    checked as vggbench.train would.

    Raises:
        SweepError: the file is missing or malformed, names unknown options, repeats a
            grid key on the command line, or a grid point is not a valid training.
    """
    path = Path(path)
    spec = _read(path)
    unknown = set(spec) - set(SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"a sweep file has {', '.join(SWEEP_KEYS)}")
    if "grid" not in spec:
        raise SweepError(f"{path}: no 'grid': list the values to combine, e.g. grid: {{seed: [0, 1, 2]}}")
    base = _options(spec.get("base") or {}, path, "base")
    grid = _grid(spec["grid"], path)
    cli = list(train_argv)
    given = explicit_options(cli)
    repeated = sorted(given & set(grid))
    if repeated:
        raise SweepError(f"{path}: --{', --'.join(map(flag, repeated))} given on the command line and in the grid; "
                         "remove one")
    root = Path(_parse(cli, path, "the command line").out_dir if "out_dir" in given
                else spec.get("out_dir") or DEFAULT_OUT_DIR)
    runs: list[SweepRun] = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        argv = [*_argv(base), *cli, *_argv(point)]
        where = "grid point " + ", ".join(f"{key}={value!r}" for key, value in point.items())
        cfg = _parse(argv, path, where)
        try:
            cfg.validate()
        except ConfigError as err:
            raise SweepError(f"{path}: {where}: {err}") from None
        run_dir = root / _run_name(replace(cfg, out_dir=None), grid)
        runs.append(SweepRun(run_dir, [*argv, "--out-dir", str(run_dir)]))
    names = [run.run_dir for run in runs]
    duplicates = sorted({str(d) for d in names if names.count(d) > 1})
    if duplicates:
        raise SweepError(f"{path}: grid points share run directories ({', '.join(duplicates)}): "
                         "remove repeated values from the grid")
    return runs


def _read(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (JSON for .json, else YAML)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepError(f"sweep file {path}: cannot read it ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SweepError(f"sweep file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") \
            from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    return data


def _option_name(key: Any, path: Path, section: str) -> str:
    """A vggbench.train option name from a sweep key (dashes or underscores)."""
    name = str(key).replace("-", "_")
    if name in RESERVED_KEYS:
        raise SweepError(f"{path}: {section}.{key}: set by the sweep itself (run directories go under the "
                         "top-level out_dir; runs with checkpoints are continued)")
    if name not in _FIELDS:
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"{path}: {section}.{key} is not a vggbench.train option{hint}; "
                         "see python -m vggbench.train --help")
    return name


def _check_value(name: str, value: Any, path: Path, where: str) -> None:
    """Booleans for on/off options, numbers or strings for the others."""
    if _FIELDS[name].type in ("bool", "bool | None"):
        if not isinstance(value, bool):
            raise SweepError(f"{path}: {where}: {value!r} is not true or false")
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SweepError(f"{path}: {where}: {value!r} is not a number or a string")


def _options(section: Any, path: Path, name: str) -> dict[str, Any]:
    """The `base` mapping with option names normalised and values checked."""
    if not isinstance(section, dict):
        raise SweepError(f"{path}: {name} must be a mapping of vggbench.train options to values")
    options = {}
    for key, value in section.items():
        option = _option_name(key, path, name)
        _check_value(option, value, path, f"{name}.{key}")
        options[option] = value
    return options


def _grid(section: Any, path: Path) -> dict[str, list[Any]]:
    """The `grid` mapping: option names to non-empty lists of values."""
    if not isinstance(section, dict) or not section:
        raise SweepError(f"{path}: grid must map vggbench.train options to lists of values, "
                         "e.g. grid: {seed: [0, 1, 2]}")
    grid = {}
    for key, values in section.items():
        option = _option_name(key, path, "grid")
        if not isinstance(values, list) or not values:
            hint = "got an empty list" if isinstance(values, list) else f"e.g. [{values!r}]"
            raise SweepError(f"{path}: grid.{key} must be a non-empty list, {hint}")
        for value in values:
            _check_value(option, value, path, f"grid.{key}")
        grid[option] = values
    return grid


def _argv(options: dict[str, Any]) -> list[str]:
    """Command-line tokens for option values (booleans as --flag / --no-flag)."""
    return [token for name, value in options.items() for token in option_argv(name, value)]


def _parse(argv: list[str], path: Path, where: str) -> TrainConfig:
    """Parse training options as vggbench.train does, reporting errors against the sweep file."""
    parser = argparse.ArgumentParser(exit_on_error=False, add_help=False)
    add_config_arguments(parser)
    try:
        return TrainConfig(**vars(parser.parse_args(argv)))
    except argparse.ArgumentError as err:
        raise SweepError(f"{path}: {where}: {err}") from None


def _run_name(cfg: TrainConfig, grid: dict[str, list[Any]]) -> str:
    """vggbench.train's default run directory name, plus -<key><value> for other grid keys."""
    name = cfg.run_dir.name
    for key in grid:
        if key not in NAMED_KEYS:
            value = getattr(cfg, key)
            name += f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"
    return name
