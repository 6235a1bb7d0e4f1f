"""What a training config needs from its data and its machine, checked before the work starts.

- BatchNorm in training mode needs more than one value per channel: batch x height x width
  at its smallest layer must exceed 1 in every training batch, including the last, shorter
  batch of an epoch (`check_batches`, once the training split's size is known).
- Memory: parameters, gradients and optimiser state plus the conv outputs backward keeps
  for one batch are a lower bound of what training needs; a run that cannot fit it is
  refused before data and model are built (`check_memory`). Running out later anyway is
  reported in one line by `out_of_memory`.

The sizes come from the model built on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vggbench.config import ConfigError
from vggbench.data import IMAGE_SIZE
from vggbench.models import build_model
from vggbench.optim import optimizer_states_per_parameter

if TYPE_CHECKING:
    from vggbench.config import TrainConfig

CIFAR_TRAIN_IMAGES = 50_000
# generating a synthetic image takes 3 float32 arrays of its size, and it is kept as uint8
SYNTHETIC_BYTES_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE * 3 * (3 * 4 + 1)
_GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a config's model for one 32x32 image."""

    num_params: int
    conv_outputs: int  # elements of all conv outputs: what backward keeps, at least
    smallest_bn_area: int | None  # height x width at the smallest BatchNorm layer; None without BatchNorm


def model_shape(cfg: TrainConfig) -> ModelShape:
    """Parameter count, conv output elements and the smallest BatchNorm input of `cfg`'s model (meta device)."""
    conv_outputs, bn_areas = [], []
    try:
        with torch.device("meta"):
            model = build_model(**{**cfg.model_spec(), "impl": "native"})  # same shapes as the fused layers
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.register_forward_hook(lambda m, args, out: conv_outputs.append(out.numel()))
                elif isinstance(module, nn.BatchNorm2d):
                    module.register_forward_pre_hook(lambda m, args: bn_areas.append(args[0][0, 0].numel()))
            model.eval()(torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE))  # eval: BatchNorm takes any size
    except RuntimeError as err:  # sizes beyond what torch can index
        raise ConfigError(f"--filters {cfg.filters}: the model is too large to build ({str(err).splitlines()[0]})") \
            from None
    return ModelShape(sum(p.numel() for p in model.parameters()), sum(conv_outputs), min(bn_areas, default=None))


def largest_train_size(cfg: TrainConfig) -> int:
    """At most how many training images a rank sees per epoch (the official CIFAR-100 for cifar100)."""
    if cfg.train_limit is not None:
        return cfg.train_limit
    total = cfg.synthetic_train_size if cfg.dataset == "synthetic" else CIFAR_TRAIN_IMAGES
    return max(total - cfg.val_size, 1)


def check_batches(cfg: TrainConfig, train_size: int, world_size: int) -> None:
    """Refuse a batch size whose batches (the last one included) give a BatchNorm layer one value per channel."""
    area = model_shape(cfg).smallest_bn_area
    if area is None:
        return
    per_rank = math.ceil(train_size / world_size)  # DistributedSampler pads the ranks' shares to equal length
    sizes = {min(cfg.batch_size, per_rank), per_rank % cfg.batch_size} - {0}
    ranks = world_size if cfg.sync_bn else 1  # SyncBatchNorm pools the ranks' values
    small = min(sizes)
    if small * area * ranks > 1:
        return
    where = "every training batch" if small == min(cfg.batch_size, per_rank) else \
        f"the last training batch of every epoch ({per_rank} images per rank in batches of {cfg.batch_size})"
    raise ConfigError(f"{where} holds {small} image(s), and after {cfg.stages} stage(s) BatchNorm sees "
                      f"{area} value(s) per channel and image: it needs more than one value per channel. "
                      "Choose another --batch-size (or --train-limit), or fewer --stages")


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (MemAvailable for the CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Refuse a run whose parameters, optimiser state and one batch's activations cannot fit `device`
    (or whose synthetic images cannot be generated in the host's memory)."""
    shape = model_shape(cfg)
    state = shape.num_params * 4 * (2 + optimizer_states_per_parameter(cfg))  # weights, gradients, optimiser
    batch = min(cfg.batch_size, math.ceil(largest_train_size(cfg) / world_size))
    activations = shape.conv_outputs * batch * (4 if cfg.precision == "fp32" else 2)
    _refuse_beyond(device, state + activations, f"parameters, gradients and optimiser state {state / _GIB:.1f} GiB, "
                   f"activations of a batch of {batch} {activations / _GIB:.1f} GiB",
                   "use fewer --filters or a smaller --batch-size")
    if cfg.dataset == "synthetic":
        images = cfg.synthetic_train_size + cfg.synthetic_test_size
        _refuse_beyond(torch.device("cpu"), images * SYNTHETIC_BYTES_PER_IMAGE, f"{images} synthetic images",
                       "use smaller --synthetic-train-size/--synthetic-test-size")


def _refuse_beyond(device: torch.device, need: int, what: str, fix: str) -> None:
    """ConfigError when `need` bytes exceed what `device` has free (nothing where that cannot be read)."""
    available = _available_bytes(device)
    if available is not None and need > available:
        raise ConfigError(f"training needs at least {need / _GIB:.1f} GiB on {device} ({what}), "
                          f"{available / _GIB:.1f} GiB are free: {fix}")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure: CUDA out of memory, the CPU allocator's, or a C++
    std::bad_alloc (the extension's own buffers) that torch passed on as a RuntimeError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "std::bad_alloc" in str(err)))
