"""Loss-surface benchmark: `python -m vggbench.landscape surface` on 1 rank vs 2 gloo ranks, 1 thread
each (vggbench/bench/surface_cases.py). One round each (minutes per round in full mode); the
target compares the two medians, so on a shared machine read it with the load in mind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vggbench.bench.surface_cases import SURFACE_IMPLS, SurfaceCase, make_run_dir, run_surface, surface_cases


@pytest.fixture(scope="module")
def surface_run(settings, tmp_path_factory) -> tuple[SurfaceCase, Path]:
    """The mode's case and a run directory holding a checkpoint of its model."""
    case = surface_cases(settings.quick)[0]
    return case, make_run_dir(case, tmp_path_factory.mktemp("surface"))


@pytest.mark.parametrize("impl", SURFACE_IMPLS)
def test_surface(impl, benchmark, surface_run) -> None:
    case, run_dir = surface_run
    benchmark.group = case.group
    benchmark.pedantic(run_surface, args=(case, run_dir, impl), rounds=1, iterations=1)
    written = json.loads((run_dir / f"surface-{impl}.json").read_text())
    assert written["world_size"] == SURFACE_IMPLS[impl]
    benchmark.extra_info.update(kind="surface", label=written["label"], impl=impl, ranks=SURFACE_IMPLS[impl],
                                threads_per_rank=1, resolution=case.resolution, samples=case.samples,
                                points=len(written["loss"]), device="cpu")
