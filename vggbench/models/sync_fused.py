"""The fused unit with BatchNorm statistics over every rank (--sync-bn with --impl fused).

Training-mode BN needs the whole batch's statistics before any element is normalised, so
the fused op runs in its two halves (csrc/fused_unit.cpp) with the cross-rank merge in
between, the same kernels as the single-process op:

    forward:  conv_stats (conv + per-channel mean/var of this rank's batch)
              -> all_gather + merge with the ranks' counts (merge_batch_stats)
              -> bn_act (normalise with the global statistics, + residual, LeakyReLU)
    backward: conv_bn_act_backward_sums (this rank's [sum(g), sum(g * xhat)])
              -> all_reduce
              -> conv_bn_act_backward with the global sums (input gradient), this rank's
                 sums for the BN parameters' gradients (DDP averages those)
    The backward op reduces this rank's batch once more: that pass also decides, per
    channel, whether xhat is recovered from the output or recomputed, which the sums op
    does not hand over. One extra read of the activations, in synchronised runs only.

Like the single-process op it saves only its input and output for backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vggbench import ops
from vggbench.models.sync_bn import merge_batch_stats

# conv_bn_act_backward's gradients, by position in _SyncedConvBnAct.forward's inputs
_GRAD_POSITIONS = (0, 1, 2, 3, 4, 5)


class _SyncedConvBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                num_batches_tracked, stride, padding, momentum, eps, slope, group):
        z, mean, var = torch.ops.vggbench.conv_stats(input, weight, bias, stride, padding)
        mean, var, total = merge_batch_stats(mean, var, z.numel() // z.shape[1], group)
        mean, var = mean.to(ops.stats_dtype(input.dtype)), var.to(ops.stats_dtype(input.dtype))
        torch.ops.vggbench.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                 total, momentum)
        out = torch.ops.vggbench.bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, slope)
        ctx.save_for_backward(out, input, weight, bias, bn_weight, bn_bias, residual, mean, var)
        ctx.options, ctx.total, ctx.group = (stride, padding, eps, slope), total, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, input, weight, bias, bn_weight, bn_bias, residual, mean, var = ctx.saved_tensors
        stride, padding, eps, slope = ctx.options
        tensors = (out, input, weight, bias, bn_weight, bn_bias, residual, mean, var)
        sums = torch.ops.vggbench.conv_bn_act_backward_sums(grad_out, *tensors, stride, padding, eps, slope)
        dist.all_reduce(sums, group=ctx.group)  # every rank, whatever it needs: a collective
        mask = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
        grads = torch.ops.vggbench.conv_bn_act_backward(
            grad_out, *tensors, stride, padding, True, eps, slope, mask, sums, ctx.total,
        )
        return (*(grad if wanted else None for grad, wanted in zip(grads, mask)),) + (None,) * 9


def synced_conv_bn_act(input: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor,
                       running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                       residual: Tensor | None, *, stride: int, padding: int, momentum: float | None, eps: float,
                       negative_slope: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """ops.conv_bn_act in training mode with BatchNorm statistics over all ranks of `group`."""
    input, weight, bias, residual = ops.autocast_operands(input, weight, bias, residual)
    return _SyncedConvBnAct.apply(input, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                                  num_batches_tracked, stride, padding, momentum, eps, negative_slope, group)
