"""Shared fixtures: small CIFAR-100 data in the real on-disk format, and a tiny training setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cifar_files import write_cifar100


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding cifar-100-python/{train,test,meta}: 6 train and 2 test images per class."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, per_class_train=6, per_class_test=2)
    return root


@pytest.fixture
def tiny_args(cifar_dir: Path, tmp_path: Path) -> list[str]:
    """`vggbench.train` options for a run of a few seconds on the fake CIFAR-100 files (500 train, 100 val)."""
    return [
        "--model", "vgg08", "--variant", "bn_rc", "--filters", "8", "--data-dir", str(cifar_dir),
        "--no-verify-checksums", "--val-size", "100", "--batch-size", "50", "--epochs", "3",
        "--workers", "0", "--device", "cpu", "--deterministic", "--seed", "3", "--no-progress",
        "--out-dir", str(tmp_path / "run"),
    ]
