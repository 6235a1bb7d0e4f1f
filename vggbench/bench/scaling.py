"""Scaling cases: how a training step's cost grows with batch size, threads and depth, native vs fused.

Each case is one model (`model_cases.MODELS` id, BN+RC at every depth so only the depth
changes), one batch size and one torch thread count; its benchmarks are model_cases'
training step (channels_last float32, Adam) of the native and the fused model, in group
`scale-<model>-N<n>-T<threads>`. As for every model benchmark, one native step is timed
before each fused round, so each fused/native ratio pairs steps taken seconds apart.

Full mode: VGG08, VGG38 and VGG98 BN+RC x batch 32, 100, 256 x 1 and 2 threads.
Quick mode (CI): VGG08 and VGG14 BN+RC x batch 2 and 4 x 1 and 2 threads, to run the path.
Leave the scaling out of a run with `-k "not scale"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vggbench.bench.model_cases import ModelCase

SCALING_IMPLS: tuple[str, ...] = ("native", "fused")


@dataclass(frozen=True)
class ScalingCase:
    """The training step of `model` on batches of `n` images, on `threads` torch threads."""

    model: str
    n: int
    threads: int

    @property
    def step(self) -> ModelCase:
        """The model case whose batch, initial state and step this case times."""
        return ModelCase(self.model, self.n)

    @property
    def group(self) -> str:
        """The pytest-benchmark group: e.g. scale-vgg98bnrc-N256-T1."""
        return f"scale-{self.model}-N{self.n}-T{self.threads}"


def scaling_cases(quick: bool) -> list[ScalingCase]:
    """Depth -> batch size -> threads; see the module doc for the grid of each mode."""
    models, sizes = (("vgg08bnrc", "vgg14bnrc"), (2, 4)) if quick else (("vgg08bnrc", "vgg38bnrc", "vgg98bnrc"),
                                                                          (32, 100, 256))
    return [ScalingCase(model, n, threads) for model in models for n in sizes for threads in (1, 2)]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
