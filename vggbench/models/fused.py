"""ConvNormAct computed by the fused C++/CUDA op (vggbench.ops.conv_bn_act).

Same constructor, same parameters and buffers under the same names (`conv.*`, `bn.*`)
as the native unit, so a model switches implementation with `impl="fused"` and
checkpoints load in either. Importing this module loads the C++ extension.

The op computes exactly one configuration of its submodules. Each forward checks (a few
attribute reads) that `conv` and `bn` are still that configuration, including after a
submodule was swapped or an attribute changed after construction, and refuses with an
error naming the attribute otherwise, rather than falling back to native layers: a silent
fallback would hide the lost fusion (memory and speed) the user asked for.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from vggbench import ops
from vggbench.models.sync_bn import SyncBatchNorm2d
from vggbench.models.sync_fused import synced_conv_bn_act
from vggbench.models.units import ConvNormAct

_NATIVE = "; use the native unit (--impl native) for it"
# Modules whose forward is what the op computes (a subclass overriding forward is not).
_CONV_FORWARDS = (nn.Conv2d.forward,)
_BN_FORWARDS = (nn.BatchNorm2d.forward, SyncBatchNorm2d.forward)


def _refuse(message: str) -> None:
    raise ValueError(f"FusedConvNormAct: {message}{_NATIVE}")


def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward not in _CONV_FORWARDS:
        _refuse(f"conv is a {type(conv).__name__}; the fused op computes nn.Conv2d's forward")
    if conv._forward_hooks or conv._forward_pre_hooks:
        _refuse("conv has forward hooks, which the fused op would not run")
    if tuple(conv.dilation) != (1, 1):
        _refuse(f"conv.dilation={tuple(conv.dilation)} is not fused (dilation 1 only)")
    if conv.groups != 1:
        _refuse(f"conv.groups={conv.groups} is not fused (groups=1 only)")
    if conv.padding_mode != "zeros":
        _refuse(f"conv.padding_mode={conv.padding_mode!r} is not fused ('zeros' only)")
    if isinstance(conv.padding, str) or len(set(conv.padding)) != 1:
        _refuse(f"conv.padding={conv.padding!r} is not fused (the same number on both sides only)")
    if len(set(conv.stride)) != 1:
        _refuse(f"conv.stride={tuple(conv.stride)} is not fused (a square stride only)")


def _check_bn(bn: nn.Module | None) -> None:
    if bn is None:
        _refuse("bn is None but norm='before'")
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward not in _BN_FORWARDS:
        _refuse(f"bn is a {type(bn).__name__}; the fused op computes nn.BatchNorm2d "
                "(or vggbench's SyncBatchNorm2d: vggbench.models.convert_sync_batchnorm)")
    if bn._forward_hooks or bn._forward_pre_hooks:
        _refuse("bn has forward hooks, which the fused op would not run")
    if not bn.affine or bn.weight is None or bn.bias is None:
        _refuse("bn.affine=False (or bn.weight/bn.bias set to None) is not fused (affine BatchNorm only)")
    if isinstance(bn.eps, bool) or not isinstance(bn.eps, numbers.Real) or not bn.eps > 0:
        _refuse(f"bn.eps={bn.eps!r} is not fused (a positive number only)")
    momentum = bn.momentum
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
                                 or not 0 <= momentum <= 1):
        _refuse(f"bn.momentum={momentum!r} is not fused (None or a number in [0, 1] only)")


class FusedConvNormAct(ConvNormAct):
    """conv -> [BN] -> (+ residual) -> LeakyReLU (or identity) in one fused op.

    Covers what the study's models use: BN before the activation (or no BN), LeakyReLU
    with any slope >= 0, no activation (projection shortcuts), conv bias on or off, any
    kernel, square stride and padding. BN after the activation, sigmoid, and convs or BNs
    configured otherwise (dilation, groups, padding modes, affine=False, ...) are refused
    with an error naming the attribute: use the native unit for those. When `bn` is a
    SyncBatchNorm2d (convert_sync_batchnorm) in a distributed run, training statistics
    cover every rank's batch.
    """

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        self._check_fusable()

    def _check_fusable(self) -> None:
        """Raise ValueError naming the first attribute the fused op would not compute exactly."""
        if self.norm == "after":
            _refuse("norm='after' is not fused (the fused unit puts BatchNorm before the activation)")
        if self.activation not in (None, "leaky_relu"):
            _refuse(f"activation={self.activation!r} is not fused (the fused unit computes LeakyReLU or "
                    "no activation)")
        if not (isinstance(self.negative_slope, numbers.Real) and self.negative_slope >= 0):
            _refuse(f"negative_slope={self.negative_slope!r} is not fused (negative_slope >= 0 only)")
        _check_conv(self.conv)
        if self.norm == "before":
            _check_bn(self.bn)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_fusable()
        conv, bn = self.conv, self.bn if self.norm == "before" else None
        slope = float(self.negative_slope) if self.activation == "leaky_relu" else 1.0  # slope 1 = identity
        stride, padding = conv.stride[0], conv.padding[0]
        if isinstance(bn, SyncBatchNorm2d) and bn.synchronised() and bn.track_running_stats:
            return synced_conv_bn_act(
                x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                bn.num_batches_tracked, residual, stride=stride, padding=padding,
                momentum=bn.momentum, eps=bn.eps, negative_slope=slope, group=bn.process_group,
            )
        if bn is None:
            return ops.conv_bn_act(x, conv.weight, conv.bias, residual=residual, stride=stride, padding=padding,
                                   negative_slope=slope)
        # nn.BatchNorm2d's rule: running statistics are used in eval, and updated in training
        # only with track_running_stats; without them, batch statistics always normalise
        tracked = not bn.training or bn.track_running_stats
        return ops.conv_bn_act(
            x, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if tracked else None, bn.running_var if tracked else None,
            bn.num_batches_tracked if tracked else None, residual=residual, stride=stride, padding=padding,
            training=bn.training, momentum=bn.momentum, eps=float(bn.eps), negative_slope=slope,
        )
