"""Gradient flow: per-parameter gradient statistics, accumulated on the device.

After every backward, `record()` computes for every parameter tensor (in forward order)
mean |grad|, max |grad| and the L2 norm with three fused multi-tensor reductions
(`torch._foreach_norm`, the kernels behind clip_grad_norm_) and adds them to one
(3, P) tensor on the device: no host sync per step. `end_epoch()` reads the averages
back once and diagnoses them.

Diagnosis rule (per epoch, weight tensors only):
    ratio = mean|grad| of the FIRST conv weight
            / max(mean|grad| of the LAST conv weight, mean|grad| of the classifier weight)
    "exploding"  if any statistic is NaN/Inf or ratio > EXPLODING_RATIO (1e3)
    "vanishing"  if ratio < VANISHING_RATIO (1e-3): the first layer learns at least a
                 thousand times slower than the last ones (the plain VGG38 signature;
                 the study saw ~1e-20 against ~2e-4)
    "healthy"    otherwise (VGG08 and the BN/RC variants sit around 0.1 .. 10)
"""

from __future__ import annotations

import math

import torch
from torch import nn

VANISHING_RATIO = 1e-3
EXPLODING_RATIO = 1e3
STATISTICS = ("mean_abs", "max_abs", "l2")
_KINDS = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.Linear: "linear"}


def describe_parameters(model: nn.Module) -> list[dict]:
    """One entry per trainable parameter in forward (registration) order: name, shape, kind, param."""
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners[full] = next((k for t, k in _KINDS.items() if isinstance(module, t)), "other")
    return [
        {"name": name, "shape": list(p.shape), "kind": owners[name], "param": name.rsplit(".", 1)[-1]}
        for name, p in model.named_parameters() if p.requires_grad
    ]


def diagnose(layers: list[dict], mean_abs: list[float], max_abs: list[float]) -> dict:
    """Classify one epoch's gradient flow as vanishing / exploding / healthy (rule in module doc)."""
    weights = {k: [i for i, layer in enumerate(layers) if layer["kind"] == k and layer["param"] == "weight"]
               for k in ("conv", "linear")}
    rule = (f"ratio = first-conv / max(last-conv, classifier) mean|grad|; vanishing < {VANISHING_RATIO:g}, "
            f"exploding > {EXPLODING_RATIO:g} or non-finite")
    if not weights["conv"]:
        return {"status": "healthy", "ratio": None, "rule": "no conv layers: " + rule}
    first = mean_abs[weights["conv"][0]]
    last = max(mean_abs[weights["conv"][-1]], *(mean_abs[i] for i in weights["linear"][-1:]))
    ratio = first / last if last > 0 else (math.inf if first > 0 else 0.0)
    finite = all(math.isfinite(v) for v in (*mean_abs, *max_abs))
    if not finite or ratio > EXPLODING_RATIO:
        status = "exploding"
    elif ratio < VANISHING_RATIO:
        status = "vanishing"
    else:
        status = "healthy"
    return {"status": status, "ratio": ratio if math.isfinite(ratio) else None, "rule": rule}


class GradientFlowRecorder:
    """Accumulates gradient statistics per step; summarises per epoch and per N-step window.

    Args:
        model: the model whose `.grad`s are read (for DDP, the synchronised gradients).
        window: if > 0, also emit a record averaged over every `window` steps of an epoch.
    """

    def __init__(self, model: nn.Module, window: int = 0) -> None:
        self.layers = describe_parameters(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.window = window
        self.epochs: list[dict] = []
        self.windows: list[dict] = []
        self._numel = None
        self._epoch_sum: torch.Tensor | None = None
        self._window_sum: torch.Tensor | None = None
        self._epoch_steps = 0
        self._window_steps = 0
        self._step = 0

    def record(self) -> None:
        """Add the current gradients' statistics to the running sums (call after backward)."""
        self.accumulate()
        self.count_step()

    @torch.no_grad()
    def accumulate(self) -> None:
        """The device half of `record()`: add the gradients' statistics into the sums, in place.

        Tensor ops only, into buffers allocated at the first call: a CUDA graph can capture it
        (vggbench.graphs), with `count_step()` run on the host after each replay.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self._numel is None:
            self._numel = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=grads[0].device)
            self._epoch_sum = self._numel.new_zeros((len(STATISTICS), len(grads)))
            self._window_sum = torch.zeros_like(self._epoch_sum)
        stats = torch.stack([
            torch.stack(torch._foreach_norm(grads, ord)).float()
            for ord in (1, math.inf, 2)
        ])
        stats[0] /= self._numel  # L1 norm / numel = mean |grad|
        self._epoch_sum += stats
        if self.window:
            self._window_sum += stats

    def count_step(self) -> None:
        """The host half of `record()`: count the step; close a window when it is full (one host read)."""
        self._epoch_steps += 1
        self._step += 1
        if self.window:
            self._window_steps += 1
            if self._window_steps == self.window:
                self.windows.append({"step_start": self._step - self.window + 1, "step_end": self._step,
                                     **self._averages(self._window_sum, self._window_steps)})
                self._window_sum.zero_()
                self._window_steps = 0

    def _averages(self, total: torch.Tensor, steps: int) -> dict:
        values = (total / steps).tolist()  # the one host sync
        return dict(zip(STATISTICS, values))

    def end_epoch(self, epoch: int) -> dict:
        """Close the epoch: average its steps, diagnose, append to `epochs` and return the record."""
        if not self._epoch_steps:
            raise RuntimeError("end_epoch() called before any record()")
        record = {"epoch": epoch, "steps": self._epoch_steps, **self._averages(self._epoch_sum, self._epoch_steps)}
        record["diagnosis"] = diagnose(self.layers, record["mean_abs"], record["max_abs"])
        self.epochs.append(record)
        # Windows do not straddle epochs, so a resume at an epoch boundary loses nothing. The sums
        # are zeroed in place: a captured step keeps adding into the same buffers.
        self._epoch_sum.zero_()
        self._window_sum.zero_()
        self._epoch_steps = self._window_steps = 0
        return record

    def state_dict(self) -> dict:
        """JSON-compatible history (what gradflow.json holds), for checkpoints."""
        return {"layers": self.layers, "epochs": self.epochs, "windows": self.windows, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history saved by `state_dict` (at an epoch boundary)."""
        if [layer["name"] for layer in state["layers"]] != [layer["name"] for layer in self.layers]:
            raise ValueError("gradient-flow history was recorded for a different model")
        self.epochs, self.windows, self._step = list(state["epochs"]), list(state["windows"]), state["step"]
