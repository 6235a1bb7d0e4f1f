"""Sweep files (vggbench.sweep): the grid's runs, their directories and command lines, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vggbench.sweep import SweepError, load_sweep

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_expands_to_one_run_per_point_named_like_train_defaults(tmp_path):
    path = write(tmp_path, "out_dir: out\nbase: {model: vgg08, epochs: 5, augment: false}\n"
                           "grid: {variant: [plain, bn_rc], lr: [0.001, 1.0e-2], seed: [0, 1]}\n")
    runs = load_sweep(path, ["--epochs", "2", "--batch-size", "50"])
    assert [run.run_dir for run in runs][:3] == [Path("out/vgg08-plain-lr0.001-seed0"),
                                                 Path("out/vgg08-plain-lr0.001-seed1"),
                                                 Path("out/vgg08-plain-lr0.01-seed0")]
    assert len(runs) == 8 and len({run.run_dir for run in runs}) == 8
    # base, then the command line (wins over base), then the grid point, then the run directory
    assert runs[-1].train_argv == ["--model", "vgg08", "--epochs", "5", "--no-augment", "--epochs", "2",
                                   "--batch-size", "50", "--variant", "bn_rc", "--lr", "0.01", "--seed", "1",
                                   "--out-dir", "out/vgg08-bn_rc-lr0.01-seed1"]


def test_other_grid_keys_extend_the_name_and_command_line_out_dir_is_the_root(tmp_path):
    path = write(tmp_path, json.dumps({"grid": {"batch-size": [50, 100], "sync_bn": [True]}}), "sweep.json")
    runs = load_sweep(path, ["--out-dir", "elsewhere"])
    assert [run.run_dir.name for run in runs] == ["vgg38-plain-lr0.001-seed7112018-batch_size50-sync_bnTrue",
                                                  "vgg38-plain-lr0.001-seed7112018-batch_size100-sync_bnTrue"]
    assert runs[0].run_dir.parent == Path("elsewhere")
    assert "--sync-bn" in runs[0].train_argv


def test_the_committed_study_sweep_is_the_studys_grid():
    runs = load_sweep(REPO / "slurm" / "study-sweep.yaml")
    assert len(runs) == 2 * 4 * 2 * 3
    assert Path("runs/study/vgg38-bn_rc-lr0.01-seed2") in {run.run_dir for run in runs}


@pytest.mark.parametrize("text, cli, message", [
    ("grid: {varient: [bn]}", [], "grid.varient is not a vggbench.train option (did you mean variant?)"),
    ("grid: {variant: [bn, bogus]}", [], "grid point variant='bogus': argument --variant: invalid choice"),
    ("grid: {lr: 0.01}", [], "grid.lr must be a non-empty list, e.g. [0.01]"),
    ("grid: {lr: []}", [], "grid.lr must be a non-empty list, got an empty list"),
    ("grid: {seed: [1, 1]}", [], "grid points share run directories"),
    ("grid: {seed: [1]}", ["--seed", "2"], "--seed given on the command line and in the grid"),
    ("grid: {seed: [1]}\nbasic: {epochs: 2}", [], "unknown top-level key(s) basic"),
    ("base: {epochs: 2}", [], "no 'grid'"),
    ("grid: {seed: [1]}\nbase: {out_dir: x}", [], "base.out_dir: set by the sweep itself"),
    ("grid: {augment: [yes-please]}", [], "'yes-please' is not true or false"),
    ("grid: {epochs: [[1, 2]]}", [], "[1, 2] is not a number or a string"),
    ("grid: {epochs: [0]}", [], "grid point epochs=0: --epochs must be >= 1"),
    ("grid: [seed]", [], "grid must map vggbench.train options to lists"),
    ("grid: {seed: [1]\n", [], "not valid YAML"),
    ("- 1\n- 2\n", [], "expected a mapping"),
])
def test_invalid_sweeps_are_explained(tmp_path, text, cli, message):
    with pytest.raises(SweepError) as err:
        load_sweep(write(tmp_path, text), cli)
    assert message in str(err.value)
    assert str(tmp_path / "sweep.yaml") in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SweepError, match=r"sweep file .*nothing\.yaml: cannot read it \(No such file"):
        load_sweep(tmp_path / "nothing.yaml")
