"""CUDA graphs for `vggbench.train --cuda-graphs`: a step captured once, replayed per batch.

`GraphedStep` wraps one of the Trainer's step functions (the training step: forward, loss,
backward, gradient-flow accumulation, optimiser step, loss and accuracy sums; or the
evaluation forward). Each is device work only, writing into buffers that live as long as the
run, so a CUDA graph can record it; what needs the host (counting steps, closing a gradient-flow
window, the progress bar's loss) happens outside, after the call.

Decisions (README, "CUDA graphs"):
- Full batches are copied into static input buffers; the first WARMUP_STEPS of them run
  eagerly on a side stream (lazy state: optimiser moments, cuDNN plans, the fused op's
  reduction counters of that stream, which must exist before it is captured), the next is
  captured on that stream and every later one replays the graph. Warm-up steps are real
  steps: every batch trains exactly once, in the same order as without graphs.
- A smaller batch (the last of an epoch) runs the step eagerly on the batch itself: epochs
  keep every image, and a run resumes exactly as without graphs.
- The learning rate is a Python float baked into the captured optimiser step: the graph is
  captured again when it changes (`key`), at most once per epoch with the per-epoch schedules.
  Checkpoints and the scheduler see the same floats as without graphs.
- The fused op's backward recomputes xhat for every channel (vggbench.ops.RECOMPUTE = "all":
  the "rule" policy reads a flag on the host), in every call, so that eager and replayed
  steps compute alike.
- Capture is impossible, and refused by `check_capturable`, on a CPU, with fp16 (GradScaler
  reads an overflow flag on the host every step) and across ranks (DDP's all-reduce).

Without capture (`capture=False`: the CPU, in tests) a GraphedStep goes through the same
warm-up, capture and re-capture decisions, but its warm-up runs on the current stream and its
"replay" calls the step on the static buffers: the code the graph records, runnable anywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor

from vggbench.config import ConfigError, TrainConfig

WARMUP_STEPS = 3  # eager steps on the side stream before the capture (PyTorch's documented warm-up)
Step = Callable[[Tensor, Tensor], Tensor | None]  # step(images, targets): device work only


def check_capturable(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Raise ConfigError when --cuda-graphs cannot capture this run's step."""
    if not cfg.cuda_graphs:
        return
    off = "drop --cuda-graphs (--no-cuda-graphs on --resume)"
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs captures CUDA work and needs a CUDA device, not {device}: use --device "
                          f"cuda, or {off}")
    if cfg.precision == "fp16":
        raise ConfigError("--cuda-graphs cannot capture fp16's gradient scaling (it reads an overflow flag on the host "
                          f"every step): use --precision bf16 or fp32, or {off}")
    if world_size > 1:
        raise ConfigError(f"--cuda-graphs captures a single process's step, not DDP's across {world_size} ranks: "
                          f"train on one GPU, or {off}")


@contextmanager
def recompute_all() -> Iterator[None]:
    """vggbench.ops.RECOMPUTE = "all" inside (when the fused op is loaded): a backward without host reads."""
    ops = sys.modules.get("vggbench.ops")
    if ops is None:  # no fused layer in this run
        yield
        return
    saved, ops.RECOMPUTE = ops.RECOMPUTE, "all"
    try:
        yield
    finally:
        ops.RECOMPUTE = saved


def on_stream(fn: Callable[[], Any], stream: torch.cuda.Stream) -> Any:
    """fn() run eagerly on `stream`, ordered after the current stream's work and before its next."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        output = fn()
    current.wait_stream(stream)
    return output


def captured(fn: Callable[[], Any], stream: torch.cuda.Stream) -> Callable[[], Any]:
    """fn() recorded on `stream` into a new CUDA graph (run nothing), as a function that replays the
    graph and returns fn's output (the same tensors each time: the graph rewrites them).

    `fn` must have run on `stream` before (the fused op's reduction counters of a stream are
    created at its first call there, which a capture cannot do)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: DataLoader's pin-memory thread may call CUDA while this thread captures
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        output = fn()

    def replay() -> Any:
        graph.replay()
        return output

    return replay


def replayable(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """The replay of `fn` captured after WARMUP_STEPS calls on the capture stream (RECOMPUTE "all"
    in all of them): a CUDA-graph variant of a benchmark's function. The warm-up calls run."""
    stream = torch.cuda.Stream(device)
    with recompute_all():
        for _ in range(WARMUP_STEPS):
            on_stream(fn, stream)
        return captured(fn, stream)


class Totals:
    """Loss and correct-prediction sums on the device, read once per epoch (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def zero_(self) -> None:
        """Start a new pass (in place: a captured step keeps adding into these tensors)."""
        self.loss.zero_()
        self.correct.zero_()

    def add(self, loss_sum: Tensor, logits: Tensor, targets: Tensor) -> None:
        """Add a batch's summed loss and its correct predictions."""
        self.loss += loss_sum
        self.correct += (logits.argmax(1) == targets).sum()


class GraphedStep:
    """`step(images, targets)` called on static input buffers, through a CUDA graph with `capture`.

    Args:
        step: device work only, returning a tensor or None (what the call returns; with a graph,
            the graph's static output, overwritten by the next replay).
        batch_size: the batch the graph takes; other batch sizes run `step` eagerly.
        capture: capture and replay a CUDA graph (inputs on CUDA), or take the same decisions
            and call `step` on the static buffers where a graph would be replayed.
        key: captured again when its value changes (the learning rates baked into the graph).
    """

    def __init__(self, step: Step, batch_size: int, capture: bool,
                 key: Callable[[], object] | None = None) -> None:
        self.step, self.batch_size, self.capture, self.key = step, batch_size, capture, key
        self.images: Tensor | None = None
        self.targets: Tensor | None = None
        self.replay: Callable[[], Tensor | None] | None = None  # the captured step (or the step itself)
        self.captures = 0  # how many times a step was captured
        self.warmup_left = WARMUP_STEPS
        self.captured_key: object = None
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor | None:
        with recompute_all() if self.capture else nullcontext():
            if images.shape[0] != self.batch_size:
                return self.step(images, targets)  # the epoch's smaller last batch
            if self.images is None:
                self.images, self.targets = torch.empty_like(images), torch.empty_like(targets)
                if self.capture:
                    self.stream = torch.cuda.Stream(self.images.device)
            self.images.copy_(images)
            self.targets.copy_(targets)
            static_step = partial(self.step, self.images, self.targets)
            if self.warmup_left:
                self.warmup_left -= 1
                return on_stream(static_step, self.stream) if self.capture else static_step()
            key = self.key() if self.key is not None else None
            if self.replay is None or key != self.captured_key:
                self.replay = None  # the previous graph's memory goes back first
                self.replay = captured(static_step, self.stream) if self.capture else static_step
                self.captured_key = key
                self.captures += 1
            return self.replay()
