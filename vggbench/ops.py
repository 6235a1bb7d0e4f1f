"""The fused conv -> BatchNorm -> (+residual) -> LeakyReLU op, from Python.

`conv_bn_act` computes, in one op with one registered backward,

    out = leaky_relu(bn(conv(input, weight, bias)) + residual, negative_slope)

exactly as nn.Conv2d -> nn.BatchNorm2d -> (+ residual) -> F.leaky_relu do, including
BatchNorm2d's running-statistics update. It keeps only its input and output for
backward (the native chain also keeps the conv and BN outputs), and with the "keep" policy
(below; on the CPU by default for bfloat16 and for convs of fewer than 8 input channels) the
conv output too.

The kernels live in csrc/ (schemas defined once in C++, a CPU and a CUDA backend, and
conv_bn_act's autograd in csrc/autograd.cpp: no Python runs per call); this module adds the
fake (meta) implementations PyTorch wants in Python so torch.compile and torch.export can
trace the ops.

Ops (torch.ops.vggbench; csrc/ops.cpp holds their schemas):
  conv_bn_act            functional forward -> (out, mean, var)
  update_running_stats_  BatchNorm2d's running-statistics update (mutates its inputs)
  _conv_bn_act_backward  its gradients (internal)
  _set_recompute         the backward policy (internal: assign RECOMPUTE instead)
  _conv_stats, _bn_act, _conv_bn_act_backward_sums
                         training-mode BN split where ranks merge statistics and sums
                         (internal; synchronised BN: vggbench.models.sync_fused)

Backward policy (RECOMPUTE): training-mode BN backward needs the normalised conv output
xhat. "rule" recovers it from the output for every channel where the recovery rule of
csrc/fused_unit_math.h proves every gradient stays within its factor of native's error,
and recomputes it with the conv otherwise (reading one host bit per unit: free on the CPU,
a small blocking copy on CUDA). "all" always recomputes it (no host read at all: safe
under CUDA graph capture; native's numerics, one more conv per unit). "keep" keeps the conv
output for backward instead, where xhat then comes from (no rule, no recompute: native's
numerics, one more activation saved per unit; units whose forward ran under another policy
are "auto"'s). "auto" (default): "keep" on the CPU for bfloat16 (there the rule often flags
channels, and a recompute costs a conv) and for convs of fewer than 8 input channels (the
entry conv: there recovery costs a large share of the unit; csrc/autograd.cpp), else "rule"
on the CPU and "all" on CUDA. Assigning vggbench.ops.RECOMPUTE sets the policy of the C++ autograd
(_set_recompute): the forward reads "keep", the backward the rest when it runs; an unknown
policy raises ValueError.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

try:
    from vggbench import _C  # noqa: F401  (loading it registers torch.ops.vggbench.*)
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "vggbench's C++ extension (vggbench._C) is not built; run `bash scripts/setup.sh`, or "
        "`pip install --no-build-isolation -e .` in the repository, then try again "
        f"(import error: {err})"
    ) from err

# The differentiable inputs, in the order _conv_bn_act_backward returns their gradients.
GRAD_INPUTS = ("input", "weight", "bias", "bn_weight", "bn_bias", "residual")

RECOMPUTE_POLICIES = ("auto", "rule", "all", "keep")
RECOMPUTE = "auto"  # the backward policy (module doc); set vggbench.ops.RECOMPUTE to change it


class _OpsModule(types.ModuleType):
    """This module, whose RECOMPUTE assignments also reach the C++ backward (csrc/autograd.cpp)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "RECOMPUTE":
            if value not in RECOMPUTE_POLICIES:
                raise ValueError(f"vggbench.ops.RECOMPUTE must be one of {RECOMPUTE_POLICIES}, got {value!r}")
            torch.ops.vggbench._set_recompute(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _OpsModule


def recompute_all(device: torch.device) -> bool:
    """Whether a backward without a kept conv output recomputes xhat for every channel
    (RECOMPUTE on this device)."""
    return RECOMPUTE == "all" or (RECOMPUTE != "rule" and device.type != "cpu")


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(input: Tensor, weight: Tensor | None = None) -> torch.memory_format:
    """The layout the op computes in: channels_last when the input or the conv weight is
    (native conv's rule), else contiguous (csrc/fused_unit.cpp uses the same rule)."""
    if _channels_last(input) or (weight is not None and _channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32, or float64 for float64 activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_operands(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The conv's operands (input, weight, bias, residual) cast to the autocast dtype when
    torch.autocast is on for their device; BN parameters and statistics stay float32."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def output_dtype(out: Tensor, residual: Tensor | None) -> torch.dtype:
    """Native's output dtype: BN's output plus a residual promotes (under autocast a float32
    residual makes the sum float32)."""
    return out.dtype if residual is None else torch.promote_types(out.dtype, residual.dtype)


def conv_bn_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    negative_slope: float = 0.01,
) -> Tensor:
    """leaky_relu(batch_norm(conv2d(input, weight, bias)) + residual, negative_slope).

    Args:
        input: (N, C, H, W), contiguous, channels_last or any strides.
        weight, bias: the conv's (K, C, kH, kW) weight and optional (K,) bias; square
            `stride` and `padding`, no dilation or groups.
        bn_weight, bn_bias: BatchNorm's affine parameters (K,); both None for no BN.
        running_mean, running_var, num_batches_tracked: BatchNorm's buffers. With
            `training`, batch statistics normalise and these are updated in place as
            nn.BatchNorm2d does (`momentum=None`: cumulative average); otherwise the
            running statistics normalise. Without running statistics, batch statistics
            always normalise (BatchNorm2d's track_running_stats=False).
        residual: optional tensor of the output's shape, added before the activation.
        negative_slope: LeakyReLU slope, >= 0 (0 is ReLU, 1 is the identity).

    Under torch.autocast the conv operands are cast to the autocast dtype; BN parameters,
    buffers and statistics stay float32. The output has native's dtype: the autocast dtype,
    or float32 with a float32 residual (the fused sum is rounded to the autocast dtype first,
    so that output carries the autocast dtype's precision, not float32's).
    The output is channels_last when the input or the weight is (as native conv's).
    """
    dtype = output_dtype(autocast_operands(input)[0], residual)
    input, weight, bias, residual = autocast_operands(input, weight, bias, residual)
    use_batch_stats = bn_weight is not None and (training or running_mean is None)
    out, mean, var = torch.ops.vggbench.conv_bn_act(
        input, weight, bias, bn_weight, bn_bias,
        None if use_batch_stats else running_mean, None if use_batch_stats else running_var,
        residual, stride, padding, use_batch_stats, eps, negative_slope,
    )
    if use_batch_stats and training and running_mean is not None:
        if running_var is None or num_batches_tracked is None:
            raise ValueError("updating running statistics needs running_var and num_batches_tracked too")
        torch.ops.vggbench.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                 None, momentum, out.numel() // out.shape[1])
    return out.to(dtype)


# --- fake implementations: output metadata only, for torch.compile / torch.export -----------
# They also run for real when a tensor is on the meta device (the Meta dispatch key wins over
# CPU and CUDA): so they check devices as the C++ kernels do, instead of returning garbage.
def _check_devices(op: str, like: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise RuntimeError(f"vggbench.{op}: {name} is on {t.device} but input is on {like.device}; "
                               "move both to the same device")


def _conv_output(input: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    n, _, height, width = input.shape
    channels, _, kh, kw = weight.shape
    shape = (n, channels, (height + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1)
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=memory_format_of(input, weight))


@torch.library.register_fake("vggbench::conv_bn_act")
def _conv_bn_act_fake(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
    stride, padding, use_batch_stats, eps, negative_slope,
):
    _check_devices("conv_bn_act", input, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
                   running_mean=running_mean, running_var=running_var, residual=residual)
    out = _conv_output(input, weight, stride, padding)
    stats = (weight.shape[0] if bn_weight is not None and use_batch_stats else 0,)
    dtype = stats_dtype(input.dtype)
    return out, input.new_empty(stats, dtype=dtype), input.new_empty(stats, dtype=dtype)


@torch.library.register_fake("vggbench::_conv_bn_act_backward")
def _conv_bn_act_backward_fake(
    grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
    stride, padding, use_batch_stats, eps, negative_slope, recompute_all, output_mask,
    local_sums=None, reduced_sums=None, kept_z=None,
):
    _check_devices("_conv_bn_act_backward", input, grad_out=grad_out, out=out, weight=weight, bias=bias,
                   bn_weight=bn_weight, bn_bias=bn_bias, residual=residual, mean=mean, var=var,
                   local_sums=local_sums, reduced_sums=reduced_sums, kept_z=kept_z)
    fmt = memory_format_of(input, weight)

    def grad(wanted: bool, like: Tensor | None) -> Tensor:
        if like is None:
            return input.new_empty((0,))
        if not wanted:
            return like.new_empty((0,))
        return torch.empty_like(like, memory_format=fmt if like.dim() == 4 else torch.contiguous_format)

    params = (input, weight, bias, bn_weight, bn_bias, residual)
    return tuple(grad(wanted, like) for wanted, like in zip(output_mask, params))


@torch.library.register_fake("vggbench::_conv_stats")
def _conv_stats_fake(input, weight, bias, stride, padding):
    _check_devices("_conv_stats", input, weight=weight, bias=bias)
    dtype = stats_dtype(input.dtype)
    channels = (weight.shape[0],)
    return (_conv_output(input, weight, stride, padding), input.new_empty(channels, dtype=dtype),
            input.new_empty(channels, dtype=dtype))


@torch.library.register_fake("vggbench::_bn_act")
def _bn_act_fake(z, mean, var, bn_weight, bn_bias, bias, residual, eps, negative_slope):
    _check_devices("_bn_act", z, mean=mean, var=var, bn_weight=bn_weight, bn_bias=bn_bias, bias=bias,
                   residual=residual)
    return torch.empty_like(z, memory_format=memory_format_of(z))


@torch.library.register_fake("vggbench::_conv_bn_act_backward_sums")
def _conv_bn_act_backward_sums_fake(grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
                                    stride, padding, eps, negative_slope, recompute_all):
    _check_devices("_conv_bn_act_backward_sums", input, grad_out=grad_out, out=out, weight=weight, bias=bias,
                   bn_weight=bn_weight, bn_bias=bn_bias, residual=residual, mean=mean, var=var)
    return mean.new_empty((2 * weight.shape[0] + 2,))


@torch.library.register_fake("vggbench::update_running_stats_")
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, count,
                               momentum, batch_count=-1):
    _check_devices("update_running_stats_", batch_mean, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, batch_var=batch_var, count=count)
