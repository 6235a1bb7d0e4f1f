"""A run does not depend on --workers: shuffling and augmentation come from (seed, epoch, sample index) alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import metrics, without_timing
from vggbench.checkpoint import load_checkpoint
from vggbench.train import main


def run_args(cifar_dir: Path, out: Path, workers: int) -> list[str]:
    """Two short epochs of a tiny VGG08 BN+RC with augmentation, on the CPU, deterministic."""
    return ["--model", "vgg08", "--variant", "bn_rc", "--filters", "4", "--data-dir", str(cifar_dir),
            "--no-verify-checksums", "--val-size", "100", "--train-limit", "200", "--batch-size", "50",
            "--epochs", "2", "--workers", str(workers), "--device", "cpu", "--deterministic", "--seed", "3",
            "--no-progress", "--keep-checkpoints", "0", "--out-dir", str(out)]


def final_state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "epoch-0002.pt")


def assert_same_run(run: Path, reference: Path) -> None:
    assert without_timing(metrics(run)) == without_timing(metrics(reference))
    got, expected = final_state(run), final_state(reference)
    for part in ("model", "best_model"):
        for name, tensor in expected[part].items():
            assert torch.equal(got[part][name], tensor), (part, name)
    assert got["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for index, moments in expected["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][index][k], v) for k, v in moments.items())


@pytest.fixture(scope="module")
def runs(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same training with 0, 1 and 2 DataLoader workers."""
    root = tmp_path_factory.mktemp("workers")
    for workers in (0, 1, 2):
        assert main(run_args(cifar_dir, root / f"w{workers}", workers)) == 0
    return {workers: root / f"w{workers}" for workers in (0, 1, 2)}


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_count_does_not_change_the_run(runs, workers):
    assert_same_run(runs[workers], runs[0])


def test_resume_onto_another_worker_count_gives_the_same_run(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[2], resumed)
    for later in ("checkpoints/epoch-0002.pt", "test.json"):
        (resumed / later).unlink()
    assert main(["--out-dir", str(resumed), "--resume", "--workers", "1", "--no-progress"]) == 0
    assert_same_run(resumed, runs[0])
