"""Ops dispatched per unit: the benchmark's 32->32 BN+residual unit (small batch, float32,
channels_last), native vs fused, in its training forward, backward and eval forward
(vggbench/bench/op_counts.py counts them with torch.profiler). One round each: its time is the
profiled passes, not a benchmark figure; extra_info records the counts by op name per phase.
"""

from __future__ import annotations

import pytest

from vggbench.bench.op_counts import UNIT_IMPLS, unit_counts

N, SIZE = 4, 8  # a count is per call, not per element: a small batch is enough


@pytest.mark.parametrize("impl", UNIT_IMPLS)
def test_op_counts(impl, benchmark, settings) -> None:
    benchmark.group = f"opcounts-res-N{N}-H{SIZE}-float32-channels_last"
    counts = benchmark.pedantic(unit_counts, args=(impl, settings.device, N, SIZE), rounds=1, iterations=1)
    benchmark.extra_info.update(kind="op_counts", impl=impl, n=N, size=SIZE, device=str(settings.device),
                                counts={phase: dict(c) for phase, c in counts.items()})
