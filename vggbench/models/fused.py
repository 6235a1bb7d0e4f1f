"""ConvNormAct computed by the fused C++/CUDA op (vggbench.ops.conv_bn_act).

Same constructor, same parameters and buffers under the same names (`conv.*`, `bn.*`)
as the native unit, so a model switches implementation with `impl="fused"` and
checkpoints load in either. Importing this module loads the C++ extension.
"""

from __future__ import annotations

import torch

from vggbench import ops
from vggbench.models.sync_bn import SyncBatchNorm2d
from vggbench.models.sync_fused import synced_conv_bn_act
from vggbench.models.units import ConvNormAct


class FusedConvNormAct(ConvNormAct):
    """conv -> [BN] -> (+ residual) -> LeakyReLU (or identity) in one fused op.

    Covers what the study's models use: BN before the activation (or no BN), LeakyReLU
    with any slope >= 0, no activation (projection shortcuts), conv bias on or off, any
    square kernel, stride and padding. BN after the activation and sigmoid are not fused:
    use the native unit for those. When `bn` is a SyncBatchNorm2d (convert_sync_batchnorm)
    in a distributed run, training statistics cover every rank's batch.
    """

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        if self.norm == "after":
            raise ValueError("the fused unit puts BatchNorm before the activation; use the native unit "
                             "(--impl native) for norm='after'")
        if self.activation == "sigmoid":
            raise ValueError("the fused unit computes LeakyReLU (or no activation); use the native unit "
                             "(--impl native) for sigmoid")
        if self.negative_slope < 0:
            raise ValueError(f"the fused unit needs negative_slope >= 0, got {self.negative_slope}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        slope = self.negative_slope if self.activation == "leaky_relu" else 1.0  # slope 1 = identity
        if isinstance(bn, SyncBatchNorm2d) and bn.synchronised():
            return synced_conv_bn_act(
                x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                bn.num_batches_tracked, residual, stride=conv.stride[0], padding=conv.padding[0],
                momentum=bn.momentum, eps=bn.eps, negative_slope=slope, group=bn.process_group,
            )
        bn_args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked) if bn else ()
        return ops.conv_bn_act(
            x, conv.weight, conv.bias, *bn_args, residual=residual,
            stride=conv.stride[0], padding=conv.padding[0],
            training=bn.training if bn else False, momentum=bn.momentum if bn else None,
            eps=bn.eps if bn else 1e-5, negative_slope=slope,
        )
