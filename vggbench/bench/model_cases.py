"""Model-level cases: one training step of the study's models, native vs fused.

A step is what vggbench.train does per batch (no scaler): forward, cross-entropy,
zero_grad(set_to_none=True), backward, [gradient-flow recording], Adam step; images
channels_last; float32, or under bf16 autocast (the GPU's VGG38 BN+RC case). Implementations
(timed in this order; `native` is the baseline):

  native    build_model(..., impl="native")
  fused     build_model(..., impl="fused"), loaded with the native model's initial state
  gradflow  native plus GradientFlowRecorder.record() after backward, as train.py does:
            its time over `native`'s is the cost of recording the gradient flow
  probe     not a step: one landscape probe (vggbench.landscape.probe, MULTIPLIERS) on the
            case's batch, what `vggbench.train --landscape-every 1` adds per epoch; its cost
            per epoch is its time over STEPS_PER_EPOCH native steps
  native+graph, fused+graph
            CUDA only: native's or fused's step (Adam with capturable=True) captured in a
            CUDA graph (vggbench.graphs.replayable), timed by replaying it, as
            `vggbench.train --cuda-graphs` runs it

On CUDA every implementation also records the host syncs one step makes
(torch.cuda.set_sync_debug_mode: count_host_syncs).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggbench.gradflow import GradientFlowRecorder
from vggbench.graphs import replayable
from vggbench.landscape.probe import probe
from vggbench.memory import SavedBytes, saved_bytes
from vggbench.models import VGG, build_model, model_label

# id: (model name, variant)
MODELS: dict[str, tuple[str, str]] = {"vgg08": ("vgg08", "plain"), "vgg38bn": ("vgg38", "bn"),
                                      "vgg38bnrc": ("vgg38", "bn_rc"), "vgg08bnrc": ("vgg08", "bn_rc"),
                                      "vgg14bnrc": ("vgg14", "bn_rc"), "vgg98bnrc": ("vgg98", "bn_rc")}
STEP_MODELS: tuple[str, ...] = ("vgg08", "vgg38bn", "vgg38bnrc")  # the step benchmarks' (scaling.py uses all)
MODEL_IMPLS: tuple[str, ...] = ("native", "fused", "gradflow", "probe", "native+graph", "fused+graph")
GRAPH_IMPLS: tuple[str, ...] = MODEL_IMPLS[-2:]
GRADFLOW_MODEL = "vgg38bnrc"  # gradient-flow recording and the landscape probe are measured on this model only
STEPS_PER_EPOCH = 475  # the study's epoch: 47,500 training images in batches of 100


@dataclass(frozen=True)
class ModelCase:
    """One model (`MODELS` id) trained on batches of `n` images of `size` x `size`, channels_last, float32
    or (`autocast`) under bf16 autocast; `graphs`: with the CUDA-graph variants (CUDA only)."""

    model: str
    n: int
    size: int = 32
    autocast: bool = False
    graphs: bool = False

    @property
    def label(self) -> str:
        """The study's name, e.g. "VGG38 BN+RC", and "(bf16 autocast)" under autocast."""
        return model_label(*MODELS[self.model]) + " (bf16 autocast)" * self.autocast

    @property
    def group(self) -> str:
        """The pytest-benchmark group: e.g. step-vgg38bnrc-N100-H32, step-vgg38bnrc-N100-H32-bf16."""
        return f"step-{self.model}-N{self.n}-H{self.size}" + "-bf16" * self.autocast

    @property
    def impls(self) -> tuple[str, ...]:
        """The implementations benchmarked for this model."""
        extras = (("gradflow", "probe") if self.model == GRADFLOW_MODEL and not self.autocast else ())
        return ("native", "fused", *extras, *GRAPH_IMPLS * self.graphs)


def model_cases(quick: bool, graphs: bool = False) -> list[ModelCase]:
    """The study's batch of 100 at 32x32; quick mode (CI): batches of 8. The step models in float32,
    then VGG38 BN+RC under bf16 autocast (the GPU's targets; on the CPU, where --impl auto takes
    the fused op in bf16 too, its measure). With `graphs` (CUDA): the CUDA-graph variants."""
    n = 8 if quick else 100
    cases = [ModelCase(model, n, graphs=graphs) for model in STEP_MODELS]
    return cases + [ModelCase(GRADFLOW_MODEL, n, autocast=True, graphs=graphs)]


class ModelBench:
    """A batch and the initial state of one case's model, and its training steps per implementation."""

    def __init__(self, case: ModelCase, device: torch.device) -> None:
        self.case, self.device = case, device
        seed = zlib.crc32(case.group.encode())
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(case.n, 3, case.size, case.size, generator=gen)
        self.images = images.to(device).contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, 100, (case.n,), generator=gen).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.state = build_model(*MODELS[case.model]).state_dict()

    def model(self, impl: str) -> VGG:
        """A fresh model of `impl` in training mode, from the case's initial state."""
        fused = impl in ("fused", "fused+graph")
        model = build_model(*MODELS[self.case.model], impl="fused" if fused else "native")
        model.load_state_dict(self.state)
        return model.to(self.device, memory_format=torch.channels_last).train()

    def saved_bytes(self, model: VGG) -> SavedBytes:
        """Bytes autograd keeps after a training forward; images and parameters are `excluded`."""
        def forward() -> torch.Tensor:
            with self.autocast():
                return model(self.images)

        return saved_bytes(forward, exclude=[self.images, *model.parameters()])

    def autocast(self) -> torch.autocast:
        """The case's autocast (bf16 or off); no cache: a capture forbids it, and eager steps then cast
        as replays do."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.case.autocast, cache_enabled=False)

    def step_fn(self, model: VGG, impl: str) -> Callable[[], None]:
        """One training step of `model` (Adam, lr 1e-3), recording the gradient flow for `gradflow`;
        for `probe`, one landscape probe instead; for a CUDA-graph variant, the replay of the step
        (captured now, after warm-up steps)."""
        if impl == "probe":
            return lambda: probe(model, lambda forward: F.cross_entropy(forward(self.images), self.targets), lr=1e-3)
        graphed = impl in GRAPH_IMPLS
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graphed)
        recorder = GradientFlowRecorder(model) if impl == "gradflow" else None

        def step() -> None:
            with self.autocast():
                loss = F.cross_entropy(model(self.images).float(), self.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recorder is not None:
                recorder.record()
            optimizer.step()

        return replayable(step, self.device) if graphed else step
