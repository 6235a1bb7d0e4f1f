"""Loss-surface case: a Li et al. surface of VGG38 BN+RC over 1 and 2 gloo ranks, 1 thread each.

Each implementation is one run of `python -m vggbench.landscape surface` (process start-up,
data, model, grid, gather, JSON and PNG included: what a user waits for) with
OMP_NUM_THREADS=1, on a run directory `make_run_dir` trains for one step on synthetic data
(the weights' values do not change the work). `1rank` runs in one process, `2ranks` with
--nproc 2; the target compares their times.

Full mode: the target's 21x21 grid would take ~2.5 h on one thread (~20 s per point on 2,500
images here), so it evaluates a 4x4 grid on the 2,500 validation images: the points split
8 / 8 over the two ranks as the 21x21 grid's split 221 / 220, and per-point work is the same.
Quick mode: VGG08, 3x3 on 100 images, to run the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vggbench.train import main as train_main

SURFACE_GROUP = "surface-vgg38bnrc-4x4-val2500"
SURFACE_IMPLS: dict[str, int] = {"1rank": 1, "2ranks": 2}


@dataclass(frozen=True)
class SurfaceCase:
    """A surface of `model` (`variant`) on `samples` validation images, `resolution` x `resolution` points."""

    model: str
    variant: str
    resolution: int
    samples: int

    @property
    def group(self) -> str:
        grid = f"{self.resolution}x{self.resolution}"
        return f"surface-{self.model}{self.variant.replace('_', '')}-{grid}-val{self.samples}"


def surface_cases(quick: bool) -> list[SurfaceCase]:
    """VGG38 BN+RC 4x4 on 2,500 images (full); VGG08 3x3 on 100 (quick)."""
    return [SurfaceCase("vgg08", "plain", 3, 100)] if quick else [SurfaceCase("vgg38", "bn_rc", 4, 2500)]


def make_run_dir(case: SurfaceCase, root: Path) -> Path:
    """A run directory with a checkpoint of the case's model (one training step on synthetic data)."""
    run = root / case.group
    train_main(["--model", case.model, "--variant", case.variant, "--dataset", "synthetic",
                "--synthetic-train-size", str(case.samples + 100), "--synthetic-test-size", "100",
                "--val-size", str(case.samples), "--batch-size", "100", "--epochs", "1", "--workers", "0",
                "--device", "cpu", "--no-progress", "--out-dir", str(run)])
    return run


def surface_command(case: SurfaceCase, run_dir: Path, impl: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one implementation (1 thread per process)."""
    argv = [sys.executable, "-m", "vggbench.landscape", "surface", str(run_dir), "--resolution", str(case.resolution),
            "--samples", str(case.samples), "--no-progress", "--out", str(run_dir / f"surface-{impl}.json")]
    if SURFACE_IMPLS[impl] > 1:
        argv += ["--nproc", str(SURFACE_IMPLS[impl])]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    return argv, env


def run_surface(case: SurfaceCase, run_dir: Path, impl: str) -> None:
    """Run one implementation; RuntimeError with its stderr when it fails."""
    argv, env = surface_command(case, run_dir, impl)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
