"""BatchNorm over the global batch of a distributed run (--sync-bn), on CPU (gloo) and CUDA (NCCL).

torch.nn.SyncBatchNorm refuses CPU tensors, and the study's distributed runs are tested on
CPU ranks, so this is the same semantics in portable collectives:

forward (training, world size > 1): every rank computes its per-channel count n_r, mean
    m_r and sum of squared deviations M2_r; one all_gather merges them with Chan's
    parallel formula, so counts may differ per rank:
        N = sum n_r,  mean = sum n_r m_r / N,  M2 = sum M2_r + sum n_r (m_r - mean)^2,
        var = M2 / N (normalisation), M2 / (N - 1) (running_var, like BatchNorm2d).
backward: with xhat = (x - mean) / sqrt(var + eps) and dy this rank's upstream gradient,
        dx = w / sqrt(var + eps) * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)
    where the two per-channel sums run over all ranks (one all_reduce). The weight and bias
    gradients are this rank's sums, which DDP then averages like every other gradient.
Otherwise (evaluation, a single process) it is exactly BatchNorm2d.

Statistics and the arithmetic are float32 (the merge float64) whatever the input dtype,
as for BatchNorm2d under autocast. Nothing is read back to the host: counts stay tensors,
so a global batch of one value per channel is not refused as native SyncBatchNorm does
(its running variance becomes NaN).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_REDUCED_DIMS = (0, 2, 3)  # all but the channel dimension of (N, C, H, W)


def _channel(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def merge_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int,
                      group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-channel mean and biased variance of the union of every rank's batch.

    `mean`, `var`: this rank's (biased) statistics over `count` values per channel (counts
    may differ per rank; a rank with an empty batch passes count 0). One all_gather, merged
    with Chan's formula in float64; returns the merged statistics in float64 and the total
    count as a 0-d float64 tensor: nothing is read back to the host (no device stall).
    """
    local = torch.cat([mean, var * count, mean.new_full((1,), count)]).double()  # a fill, not a copy
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    gathered = torch.stack(gathered)
    channels = mean.shape[0]
    means, m2s, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
    total = counts.sum()
    merged = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - merged) ** 2).sum(0)
    return merged, m2 / total, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics and backward reductions over every rank (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        xf = x.float()
        count = xf.numel() // xf.shape[1]
        if count:
            var, mean = torch.var_mean(xf, dim=_REDUCED_DIMS, correction=0)
        else:  # an empty batch on this rank contributes nothing
            var = mean = xf.new_zeros(xf.shape[1])
        mean, var, total = merge_batch_stats(mean, var, count, group)
        with torch.no_grad():  # momentum: a float, or a 0-d tensor of the buffers' dtype
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (total / (total - 1))).to(running_var.dtype), momentum)
        mean, invstd = mean.float(), torch.rsqrt(var + eps).float()
        scale = weight.float() * invstd
        out = xf * _channel(scale) + _channel(bias.float() - mean * scale)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.group = total.float(), group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = grad_out.float()
        xhat = (x.float() - _channel(mean)) * _channel(invstd)
        sum_dy = dy.sum(_REDUCED_DIMS)
        sum_dy_xhat = (dy * xhat).sum(_REDUCED_DIMS)
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / ctx.total).chunk(2)
            grad_x = ((dy - _channel(mean_dy) - xhat * _channel(mean_dy_xhat))
                      * _channel(weight.float() * invstd)).to(x.dtype)
        return grad_x, sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype), None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all ranks of the process group.

    Same parameters, buffers and state_dict as BatchNorm2d (checkpoints load either way);
    exactly BatchNorm2d in eval mode and when there is no process group of more than one rank.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def synchronised(self) -> bool:
        """Whether training statistics are merged across ranks now (training, > 1 rank)."""
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.synchronised():
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        # BatchNorm2d's rule: momentum None means a cumulative average over the batches seen
        # (computed on the device: no host read)
        factor = self.momentum
        if factor is None:
            factor = (1.0 / self.num_batches_tracked).to(self.running_mean.dtype)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            self.eps, factor, self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SyncBatchNorm2d sharing its parameters and buffers.

    Returns the converted module (a new one when `module` itself is a BatchNorm2d). The
    BatchNorm2d layers must be affine with running statistics (as all of vggbench's are).
    """
    if type(module) is nn.BatchNorm2d:
        if not (module.affine and module.track_running_stats):
            raise ValueError("convert_sync_batchnorm needs BatchNorm2d(affine=True, track_running_stats=True)")
        synced = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, process_group)
        synced.weight, synced.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, name, getattr(module, name))
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
