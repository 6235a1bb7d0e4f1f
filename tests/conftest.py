"""Shared fixtures and the suite's markers.

Markers (registered in pyproject.toml):
  slurm  needs a private SLURM cluster (root, Debian packages): runs when VGGBENCH_TEST_SLURM=1,
         and then fails if the cluster cannot start; skipped with the recipe otherwise
  build  compiles the C++ extension from a clean tree, and emulated AVX-512 (minutes on 2 cores): runs when
         VGGBENCH_TEST_BUILD=1, skipped otherwise
  cuda   needs a CUDA device: skipped without one
`.ci/run` sets both switches, so CI runs every test this machine can run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cifar_files import write_cifar100

# marker -> (environment switch that enables it, why it is off by default)
OPT_IN = {
    "slurm": ("VGGBENCH_TEST_SLURM", "needs a private SLURM cluster (root; installs Debian's slurm packages)"),
    "build": ("VGGBENCH_TEST_BUILD",
              "compiles the C++ extension from a clean tree, and emulated AVX-512 (~15 minutes on 2 cores)"),
}


def opted_in(marker: str) -> bool:
    """Whether the environment switch of an opt-in marker is on."""
    return os.environ.get(OPT_IN[marker][0], "0").lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use the SLURM cluster; skip opt-in and CUDA tests this run cannot run, saying how."""
    for item in items:
        if "slurm_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        for marker, (switch, why) in OPT_IN.items():
            if item.get_closest_marker(marker) and not opted_in(marker):
                item.add_marker(pytest.mark.skip(
                    reason=f"{why}: run with {switch}=1 .venv/bin/python -m pytest -m {marker} (.ci/run does)"))
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none is visible here)"))


@pytest.fixture(scope="session", autouse=True)
def sigint_raises_keyboardinterrupt() -> Iterator[None]:
    """Let Ctrl-C (SIGINT) raise KeyboardInterrupt here and in child processes.

    A shell running the suite in the background (`cmd &`, CI runners, nohup-like wrappers)
    starts it with SIGINT ignored; children inherit an ignored signal, and Python then never
    turns SIGINT into KeyboardInterrupt, so the Ctrl-C tests would test nothing. A handled
    signal is reset to the default in an exec'd child, which Python turns into KeyboardInterrupt.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


@pytest.fixture(autouse=True)
def numerics_left_as_found() -> Iterator[None]:
    """Restore torch's global numerics switches after each test: a run started in-process
    (train.main) sets them for itself (--deterministic), and a later test would otherwise see
    them (deterministic mode fills every new tensor, an extra op in profiles)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
