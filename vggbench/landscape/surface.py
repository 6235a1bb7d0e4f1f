"""Loss surfaces around a checkpoint (Li et al. 2018, "Visualizing the loss landscape of neural nets").

The loss (and accuracy) of the model at theta + a * d1 (1-D) or theta + a * d1 + b * d2
(2-D) on a grid of (a, b), with random directions d1, d2 that are *filter-normalised*:
each filter of a direction (a slice along dim 0 of a conv or linear weight: one output
channel, one output neuron) is scaled to the norm of the weight's filter, so that the scale
invariance of BatchNorm'd filters does not distort the picture. Directions of 1-D
parameters (BatchNorm weights and biases, conv and linear biases) are zero, as in the paper.
The model is evaluated in eval mode (BatchNorm with the checkpoint's running statistics).

A grid is many independent evaluations: `evaluate_grid` takes every world_size-th point
from the rank's own index and gathers all points on rank 0, so the same call works in one
process, over `vggbench.launch`-style ranks (gloo) and over SLURM tasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vggbench.distributed import DistEnv


@dataclass(frozen=True)
class Grid:
    """Coordinates of a 1-D (`dims` 1) or 2-D surface: `resolution` points per axis over [low, high]."""

    dims: int
    resolution: int
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.dims not in (1, 2):
            raise ValueError(f"a surface has 1 or 2 dimensions, got {self.dims}")
        if self.resolution < 1:
            raise ValueError(f"the resolution must be >= 1 point per axis, got {self.resolution}")
        if not self.low < self.high:
            raise ValueError(f"the coordinate range [{self.low:g}, {self.high:g}] is empty: give low < high")

    @property
    def axis(self) -> list[float]:
        """The coordinates along one axis."""
        return torch.linspace(self.low, self.high, self.resolution, dtype=torch.float64).tolist()

    def points(self) -> list[tuple[float, ...]]:
        """Every grid point, row-major (b outer, a inner, for 2-D)."""
        axis = self.axis
        return [(a,) for a in axis] if self.dims == 1 else [(a, b) for b in axis for a in axis]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A random direction per parameter: Gaussian, each filter scaled to its weight filter's norm; 1-D zero."""
    direction = {}
    for name, param in model.named_parameters():
        if param.dim() <= 1:
            direction[name] = torch.zeros_like(param)
            continue
        d = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
        dims = tuple(range(1, param.dim()))
        d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(param.detach(), dim=dims, keepdim=True)
        direction[name] = d * (w_norm / (d_norm + 1e-10))  # Li et al.'s 1e-10 guards an all-zero draw
    return direction


def directions(model: nn.Module, dims: int, seed: int) -> list[dict[str, Tensor]]:
    """`dims` filter-normalised directions drawn from `seed` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    return [filter_normalized_direction(model, generator) for _ in range(dims)]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, targets: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of `model` in eval mode over the images."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        logits = model(images[start:start + batch_size]).float()
        y = targets[start:start + batch_size]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(targets), 100.0 * correct / len(targets)


@torch.no_grad()
def _at_point(model: nn.Module, origin: dict[str, Tensor], dirs: Sequence[dict[str, Tensor]],
              coords: Sequence[float]) -> None:
    """Set the model's parameters to origin + sum_i coords[i] * dirs[i]."""
    for name, param in model.named_parameters():
        value = origin[name].clone()
        for c, d in zip(coords, dirs):
            value.add_(d[name], alpha=c)
        param.copy_(value)


def _mine(count: int, env: DistEnv) -> Iterator[int]:
    return iter(range(env.rank, count, env.world_size))


def evaluate_grid(model: nn.Module, grid: Grid, dirs: Sequence[dict[str, Tensor]], images: Tensor, targets: Tensor,
                  batch_size: int, env: DistEnv | None = None, progress: bool = True) -> dict | None:
    """Loss and accuracy at every grid point; this rank evaluates points rank, rank + world, ...

    Returns on rank 0 {"coords", "loss", "acc"} (flat, in `grid.points()` order; 2-D values also
    as `resolution` rows), None on other ranks. The model's parameters are restored afterwards.
    """
    env = env or DistEnv()
    points = grid.points()
    origin = {name: p.detach().clone() for name, p in model.named_parameters()}
    mine = {}
    indices = list(_mine(len(points), env))
    try:
        for i in tqdm(indices, desc=f"surface (rank {env.rank})", disable=not progress or not env.is_main,
                      dynamic_ncols=True):
            _at_point(model, origin, dirs, points[i])
            mine[i] = evaluate(model, images, targets, batch_size)
    finally:
        _at_point(model, origin, dirs, (0.0,) * len(dirs))
    gathered = [mine]
    if env.distributed:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
    if not env.is_main:
        return None
    merged = {i: v for part in gathered for i, v in part.items()}
    loss = [merged[i][0] for i in range(len(points))]
    acc = [merged[i][1] for i in range(len(points))]
    result = {"axis": grid.axis, "coords": [list(p) for p in points], "loss": loss, "acc": acc}
    if grid.dims == 2:
        n = grid.resolution
        result["loss_grid"] = [loss[r * n:(r + 1) * n] for r in range(n)]
        result["acc_grid"] = [acc[r * n:(r + 1) * n] for r in range(n)]
    return result
