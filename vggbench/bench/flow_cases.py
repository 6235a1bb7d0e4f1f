"""Gradient-flow equivalence: does `--impl fused` see the gradient flow native PyTorch sees?

For each of the study's models (VGG08, VGG38 plain, VGG38 BN, VGG38 BN+RC) the native
float32 model trains from one initial state on fixed batches (Adam, lr 1e-3,
channels_last), and at every step three models compute the gradient at its parameters
(and BN buffers) on that step's batch:

  native   build_model(..., impl="native"), float32: the one that trains
  fused    build_model(..., impl="fused"), float32, loaded with native's state each step
  float64  native in float64, loaded with the same state: the truth both are measured against

Why one shared trajectory rather than three: Adam divides by sqrt(v), so a float32
rounding that flips the sign of a near-zero gradient moves that weight by ~lr, and two
trajectories drift apart chaotically within 20 steps whichever implementation rounds; at
shared points what differs is the gradient arithmetic alone, which is the question.

A GradientFlowRecorder on each records mean|g|, max|g| and the L2 norm of every parameter's
gradient after every step (window=1). Per statistic, `relative_difference` takes the
largest |a - b| over layers and steps, each layer relative to its own scale (its largest
reference value over the steps): plain VGG38's first layers sit near 1e-18 while its
classifier sees 1e-3, and a scale shared by all layers would hide them. Conv biases that
feed a training-mode BatchNorm are left out: their exact gradient is 0 (BN subtracts the
batch mean), so what is recorded there is rounding noise of no scale.

The tolerance is derived on the machine that runs it, not tuned on one CPU: fused is
as close to the truth as native up to a factor, plus a floor for statistics native
happens to hit almost exactly,

    fused vs float64  <=  FACTOR x (native vs float64)  +  FLOOR_ULPS x eps(dtype)

FACTOR: fused and native sum the same products in different orders (Winograd, another
reduction order in BN; fused also recovers BN's normalised input from its output), so each
is an independent rounding of the same maths; the largest of their distances to the truth
over layers and steps differ by a small factor (0.4-4.4 seen here over the four models at
two batch shapes), not by orders of magnitude: a wrong gradient (a missed residual or BN
term) is off by O(1), 10-1e5 times native's distance.
FLOOR_ULPS x eps: a few ulps per layer of a 38-layer chain, below which two float32
results are indistinguishable.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggbench.gradflow import STATISTICS, GradientFlowRecorder
from vggbench.models import build_model, model_label

# id: (model name, variant)
FLOW_MODELS: dict[str, tuple[str, str]] = {"vgg08": ("vgg08", "plain"), "vgg38": ("vgg38", "plain"),
                                           "vgg38bn": ("vgg38", "bn"), "vgg38bnrc": ("vgg38", "bn_rc")}
RUNS: dict[str, tuple[str, torch.dtype]] = {"native": ("native", torch.float32), "fused": ("fused", torch.float32),
                                            "float64": ("native", torch.float64)}
FACTOR = 8.0
FLOOR_ULPS = 64
STAT_LABELS = {"mean_abs": "mean|g|", "max_abs": "max|g|", "l2": "L2"}


@dataclass(frozen=True)
class FlowCase:
    """One model (`FLOW_MODELS` id) trained `steps` steps on batches of `n` images of `size` x `size`."""

    model: str
    n: int
    steps: int = 20
    size: int = 32
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return model_label(*FLOW_MODELS[self.model])

    @property
    def name(self) -> str:
        """E.g. flow-vgg38bnrc-N8-S20."""
        return f"flow-{self.model}-N{self.n}-S{self.steps}"


def flow_cases(quick: bool) -> list[FlowCase]:
    """The four models, 20 steps; batches of 100 at 32x32 (quick mode, CI: 4 at 16x16, where BatchNorm's
    gradients over 16 values per channel in the last stage are ill-conditioned: native itself is
    off the truth by ~1e-2 there, and the tolerance follows)."""
    return [FlowCase(model, 4, size=16) if quick else FlowCase(model, 100) for model in FLOW_MODELS]


def compared_layers(layers: list[dict]) -> list[int]:
    """Indices of the parameters compared: all but conv biases feeding a BatchNorm (module doc)."""
    names = {layer["name"] for layer in layers}
    return [i for i, layer in enumerate(layers)
            if not (layer["kind"] == "conv" and layer["param"] == "bias"
                    and layer["name"].removesuffix("conv.bias") + "bn.weight" in names)]


def tolerance(native_vs_truth: float, dtype: torch.dtype = torch.float32) -> float:
    """The largest relative difference fused may have from the truth (module doc)."""
    return FACTOR * native_vs_truth + FLOOR_ULPS * torch.finfo(dtype).eps


def relative_difference(actual: list[list[float]], reference: list[list[float]],
                        names: list[str]) -> dict:
    """Largest |a - r| / scale over steps x layers, scale = the layer's largest |r| over the steps.

    Returns {"max": value, "layer": name, "step": 1-based step} (a layer whose reference is 0
    throughout counts 0 when `actual` is 0 too, else inf)."""
    a, r = torch.tensor(actual, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    scale = r.abs().amax(dim=0, keepdim=True)
    diff = (a - r).abs()
    rel = torch.where(scale > 0, diff / scale.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.where(diff > 0, torch.inf, 0.0))
    rel = torch.nan_to_num(rel, nan=torch.inf)  # a NaN gradient is as far off as it gets
    index = int(rel.argmax())
    step, layer = divmod(index, rel.shape[1])
    return {"max": rel.flatten()[index].item(), "layer": names[layer], "step": step + 1}


class FlowBench:
    """The fixed batches and the initial state of one case; trains each run and compares them."""

    def __init__(self, case: FlowCase, device: torch.device) -> None:
        self.case, self.device = case, device
        seed = zlib.crc32(case.name.encode())
        gen = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(case.n, 3, case.size, case.size, generator=gen),
                         torch.randint(0, 100, (case.n,), generator=gen)) for _ in range(case.steps)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.state = build_model(*FLOW_MODELS[case.model]).state_dict()

    def _model(self, run: str) -> torch.nn.Module:
        impl, dtype = RUNS[run]
        model = build_model(*FLOW_MODELS[self.case.model], impl=impl)
        model.load_state_dict(self.state)
        return model.to(self.device, dtype, memory_format=torch.channels_last).train()

    def _gradients(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        dtype = next(model.parameters()).dtype
        images = images.to(self.device, dtype).contiguous(memory_format=torch.channels_last)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets.to(self.device)).backward()

    def record(self) -> dict[str, GradientFlowRecorder]:
        """Train native over the batches; per run the gradient flow of every step at native's state."""
        models = {run: self._model(run) for run in RUNS}
        native = models["native"]
        optimizer = torch.optim.Adam(native.parameters(), lr=1e-3)
        recorders = {run: GradientFlowRecorder(model, window=1) for run, model in models.items()}
        for images, targets in self.batches:
            for run, model in models.items():
                if model is not native:  # the step's state; BN buffers too (its running stats are not used)
                    model.load_state_dict(native.state_dict())
                self._gradients(model, images, targets)
                recorders[run].record()
            optimizer.step()
        return recorders

    def compare(self) -> dict:
        """Per statistic: fused vs native, native vs float64 and fused vs float64 (relative_difference
        over the compared layers), the tolerance and whether it holds; per run the statistics averaged
        over the steps, per layer (all layers)."""
        recorders = self.record()
        layers = recorders["native"].layers
        kept = compared_layers(layers)
        names = [layers[i]["name"] for i in kept]
        steps = {run: {stat: [w[stat] for w in rec.windows] for stat in STATISTICS} for run, rec in recorders.items()}
        pairs = {"fused_vs_native": ("fused", "native"), "native_vs_float64": ("native", "float64"),
                 "fused_vs_float64": ("fused", "float64")}
        stats = {}
        for stat in STATISTICS:
            diffs = {key: relative_difference([[row[i] for i in kept] for row in steps[a][stat]],
                                              [[row[i] for i in kept] for row in steps[b][stat]], names)
                     for key, (a, b) in pairs.items()}
            bound = tolerance(diffs["native_vs_float64"]["max"])
            stats[stat] = {**diffs, "tolerance": bound, "passed": diffs["fused_vs_float64"]["max"] <= bound}
        mean_over_steps = {run: {stat: torch.tensor(values).mean(0).tolist() for stat, values in by_stat.items()}
                           for run, by_stat in steps.items()}
        return {"layers": layers, "compared": kept, "stats": stats, "per_layer": mean_over_steps,
                "passed": all(s["passed"] for s in stats.values()),
                "rule": f"fused vs float64 <= {FACTOR:g} x native vs float64 + {FLOOR_ULPS} eps(float32)"}
