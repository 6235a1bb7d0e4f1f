"""Code run in processes spawned by test_distributed.py.

Kept out of the test module so that each spawned child imports only torch and
vggbench.models (fast), not the training stack.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vggbench.models import SyncBatchNorm2d, convert_sync_batchnorm

SHARES = (slice(0, 3), slice(3, 8))  # rank 0 and rank 1 hold 3 and 5 samples of one batch of 8


def sync_bn_inputs() -> tuple[torch.Tensor, ...]:
    """One batch (8, 4, 3, 3), an upstream gradient for it, and BN weight and bias."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, 3, generator=generator) * 3 + 5  # a mean far from 0 tests the variance merge
    upstream = torch.randn(8, 4, 3, 3, generator=generator)
    return x, upstream, torch.rand(4, generator=generator) + 0.5, torch.randn(4, generator=generator)


def batchnorm(weight: torch.Tensor, bias: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def sync_bn_rank(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: SyncBatchNorm2d forward and backward on its share; saves gradients and running stats."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, upstream, weight, bias = sync_bn_inputs()
    bn = convert_sync_batchnorm(batchnorm(weight, bias))
    assert isinstance(bn, SyncBatchNorm2d)
    mine = x[SHARES[rank]].clone().requires_grad_()
    (bn(mine) * upstream[SHARES[rank]]).sum().backward()
    torch.save({"grad_x": mine.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
