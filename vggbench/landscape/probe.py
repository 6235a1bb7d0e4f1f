"""Loss landscape along training (Santurkar et al. 2018, "How does batch normalization help
optimization?", Fig. 4): how far the gradient can be trusted around the current weights.

At weights theta with gradient g on a fixed probe batch, for each step multiplier s:

    loss_s          = L(theta - lr * s * g)                        the loss-variation band: min..max
    grad_diff_s     = || grad L(theta) - grad L(theta - lr * s * g) ||   gradient predictiveness: min..max
    beta_smoothness = max_s grad_diff_s / (lr * s * ||g||)          the "effective" beta-smoothness

(lr: the optimiser's current learning rate). A smooth landscape has a narrow loss band,
small gradient differences and a small beta.

`probe()` evaluates these through torch.func.functional_call on detached copies of the
parameters and buffers, so the model's parameters, .grad, BatchNorm running statistics and
the optimiser are never touched; BatchNorm runs in training mode (batch statistics) as in
the training step. `LandscapeProbe` records them every N epochs of a Trainer
(`vggbench.train --landscape-every N`) into landscape.json, in the RNG-neutral way a
bit-for-bit identical training needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from vggbench.data.loaders import TransformedView
from vggbench.device import autocast
from vggbench.run_dir import LANDSCAPE

if TYPE_CHECKING:
    from vggbench.train import Trainer

MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
LANDSCAPE_FILE = LANDSCAPE  # written by vggbench.run_dir from the checkpoint's history


def check_multipliers(multipliers: Sequence[float]) -> tuple[float, ...]:
    """The step multipliers as a tuple; ValueError when empty or not all positive and finite."""
    values = tuple(float(s) for s in multipliers)
    if not values:
        raise ValueError("the step range is empty: give at least one step multiplier s > 0")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"step multipliers must be finite and > 0, got {bad}")
    return values


def _loss_and_grad(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                   loss_of: Callable[[Callable[..., Tensor]], Tensor]) -> tuple[float, list[Tensor]]:
    """L and grad L at `params`; BatchNorm updates copies of `buffers`, never the model's."""
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    state = {**leaves, **{name: b.clone() for name, b in buffers.items()}}
    loss = loss_of(lambda *args: functional_call(model, state, args))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.item(), [g.detach() for g in grads]


def probe(model: nn.Module, loss_of: Callable[[Callable[..., Tensor]], Tensor], lr: float,
          multipliers: Sequence[float] = MULTIPLIERS) -> dict:
    """The Santurkar et al. measures at the model's current parameters (module doc).

    Args:
        model: evaluated in training mode (restored afterwards); nothing of it is modified.
        loss_of: given the model's forward function, returns the scalar loss, e.g.
            `lambda forward: F.cross_entropy(forward(images), targets)`.
        lr: the learning rate that scales the steps.
        multipliers: the step multipliers s (> 0).
    """
    multipliers = check_multipliers(multipliers)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate must be finite and > 0, got {lr}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    was_training = model.training
    model.train()
    try:
        loss, grad = _loss_and_grad(model, params, buffers, loss_of)
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad])).item()
        losses, diffs = [], []
        for s in multipliers:
            stepped = {name: p.detach() - lr * s * g for (name, p), g in zip(params.items(), grad)}
            loss_s, grad_s = _loss_and_grad(model, stepped, buffers, loss_of)
            diff = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b)
                                                         for a, b in zip(grad, grad_s)])).item()
            losses.append(loss_s)
            diffs.append(diff)
    finally:
        model.train(was_training)
    betas = [d / (lr * s * grad_norm) if grad_norm > 0 else 0.0 for s, d in zip(multipliers, diffs)]
    return {"lr": lr, "loss": loss, "grad_norm": grad_norm, "multipliers": list(multipliers), "losses": losses,
            "grad_diffs": diffs, "loss_band": [min(losses), max(losses)],
            "predictiveness_band": [min(diffs), max(diffs)], "beta_smoothness": max(betas)}


class LandscapeProbe:
    """Records `probe()` on a fixed batch every `every` epochs of a training run (0: never).

    Every random stream (CPU and CUDA generators) is saved and restored around a probe, so a
    run with the probe trains bit-for-bit as one without it. `state_dict()` goes into the
    Trainer's checkpoint history, so a resumed run continues the same landscape.json.
    """

    def __init__(self, model: nn.Module, images: Tensor, targets: Tensor, lr: Callable[[], float], every: int,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 multipliers: Sequence[float] = MULTIPLIERS) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.model, self.images, self.targets = model, images, targets
        self.lr, self.every, self.autocast = lr, every, autocast
        self.multipliers = check_multipliers(multipliers)
        self.epochs: list[dict] = []

    @classmethod
    def for_trainer(cls, trainer: Trainer) -> LandscapeProbe:
        """The probe of a Trainer: its first `batch_size` training images without augmentation, its
        plain model (not the DDP wrapper: no gradient all-reduce), its optimiser's lr and autocast."""
        every = trainer.cfg.landscape_every
        images, targets = (probe_batch(trainer.splits.train, trainer.cfg.batch_size) if every
                           else (torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)))  # off: no data read
        return cls(trainer.model, images.to(trainer.device, memory_format=trainer.memory_format),
                   targets.to(trainer.device), lambda: trainer.optimizer.param_groups[0]["lr"],
                   every, lambda: autocast(trainer.cfg, trainer.device))

    def record(self, epoch: int) -> dict | None:
        """Probe after `epoch` when it is a multiple of `every`; the record, or None."""
        if not self.every or epoch % self.every:
            return None
        devices = [self.images.device] if self.images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):

            def loss_of(forward: Callable[..., Tensor]) -> Tensor:
                with self.autocast():
                    return F.cross_entropy(forward(self.images).float(), self.targets)

            record = {"epoch": epoch, **probe(self.model, loss_of, self.lr(), self.multipliers)}
        self.epochs.append(record)
        return record

    def state_dict(self) -> dict:
        """JSON-compatible history (what landscape.json holds)."""
        return {"every": self.every, "batch_size": len(self.targets), "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history of `state_dict()`."""
        self.epochs = list(state["epochs"])


def final_smoothness(run_dir: str | Path) -> dict | None:
    """The last probed epoch of a run's landscape.json as {"epoch", "beta_smoothness", "loss_band" (its
    width: max - min loss over the step multipliers)}; None without a file or probed epochs."""
    path = Path(run_dir) / LANDSCAPE_FILE
    if not path.is_file():
        return None
    epochs = json.loads(path.read_text()).get("epochs") or []
    if not epochs:
        return None
    last = epochs[-1]
    return {"epoch": last["epoch"], "beta_smoothness": last["beta_smoothness"],
            "loss_band": last["loss_band"][1] - last["loss_band"][0]}


def probe_batch(train_split, size: int) -> tuple[Tensor, Tensor]:
    """The first `size` images of the training split, without augmentation (no random stream used)."""
    view = TransformedView(train_split.base, list(train_split.indices)[:size], augment=False)
    images, targets = zip(*(view[i] for i in range(len(view))))
    return torch.stack(images), torch.tensor(targets)
