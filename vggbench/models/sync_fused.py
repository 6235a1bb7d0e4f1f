"""The fused unit with BatchNorm statistics over every rank (--sync-bn with --impl fused).

Training-mode BN needs the whole batch's statistics before any element is normalised, so
the fused op runs in its two halves (csrc/ops.cpp) with the cross-rank merge in between,
the same kernels as the single-process op:

    forward:  _conv_stats (conv without bias + per-channel mean/var of this rank's batch)
              -> all_gather + merge with the ranks' counts (merge_batch_stats)
              -> update_running_stats_
              -> _bn_act (normalise with the global statistics, bias, + residual, LeakyReLU)
    backward: _conv_bn_act_backward_sums (this rank's [sum(g), sum(g * xhat), count,
              recomputed]: the one reduction pass, which also decides recover or recompute)
              -> all_reduce of [sum(g), sum(g * xhat), count]
              -> _conv_bn_act_backward with the local and the reduced sums: the input
                 gradient from the global sums, the BN parameters' gradients from this
                 rank's (DDP averages those); it reduces nothing again.

No host reads: the counts and the merged total stay tensors (with a rank whose batch is
empty taking part with count 0). Unlike native SyncBatchNorm, a global batch of a single
value per channel is not refused (that needs a host read): its running variance becomes
NaN. Like the single-process op it saves only its input and output for backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vggbench import ops
from vggbench.models.sync_bn import merge_batch_stats

# _conv_bn_act_backward's gradients, by position in _SyncedConvBnAct.forward's inputs
_GRAD_POSITIONS = tuple(range(len(ops.GRAD_INPUTS)))


class _SyncedConvBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                num_batches_tracked, stride, padding, momentum, eps, slope, group):
        z, mean, var = torch.ops.vggbench._conv_stats(input, weight, bias, stride, padding)
        mean, var, total = merge_batch_stats(mean, var, z.numel() // z.shape[1], group)
        stats = ops.stats_dtype(input.dtype)
        mean, var, total = mean.to(stats), var.to(stats), total.to(stats)
        torch.ops.vggbench.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                 total, momentum)
        out = torch.ops.vggbench._bn_act(z, mean, var, bn_weight, bn_bias, bias, residual, eps, slope)
        ctx.save_for_backward(out, input, weight, bias, bn_weight, bn_bias, residual, mean, var)
        ctx.options, ctx.group = (stride, padding, eps, slope), group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, input, weight, bias, bn_weight, bn_bias, residual, mean, var = ctx.saved_tensors
        stride, padding, eps, slope = ctx.options
        tensors = (out, input, weight, bias, bn_weight, bn_bias, residual, mean, var)
        recompute_all = ops.recompute_all(out.device)
        local = torch.ops.vggbench._conv_bn_act_backward_sums(grad_out, *tensors, stride, padding, eps, slope,
                                                               recompute_all)
        reduced = local[:-1].clone()  # [sum(g), sum(g * xhat), count]; `recomputed` stays this rank's
        dist.all_reduce(reduced, group=ctx.group)  # every rank, whatever it needs: a collective
        mask = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
        grads = torch.ops.vggbench._conv_bn_act_backward(
            grad_out, *tensors, stride, padding, True, eps, slope, recompute_all, mask, local, reduced,
        )
        return (*(grad if wanted else None for grad, wanted in zip(grads, mask)),) + (None,) * 9


def synced_conv_bn_act(input: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor,
                       running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                       residual: Tensor | None, *, stride: int, padding: int, momentum: float | None, eps: float,
                       negative_slope: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """ops.conv_bn_act in training mode with BatchNorm statistics over all ranks of `group`."""
    dtype = ops.output_dtype(ops.autocast_operands(input)[0], residual)
    input, weight, bias, residual = ops.autocast_operands(input, weight, bias, residual)
    out = _SyncedConvBnAct.apply(input, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                                 num_batches_tracked, stride, padding, momentum, eps, negative_slope, group)
    return out.to(dtype)
