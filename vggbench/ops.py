"""The fused conv -> BatchNorm -> (+residual) -> LeakyReLU op, from Python.

`conv_bn_act` computes, in one op with one registered backward,

    out = leaky_relu(bn(conv(input, weight, bias)) + residual, negative_slope)

exactly as nn.Conv2d -> nn.BatchNorm2d -> (+ residual) -> F.leaky_relu do, including
BatchNorm2d's running-statistics update. It keeps only its input and output for
backward (the native chain also keeps the conv and BN outputs).

The kernels live in csrc/ (schemas defined once in C++, a CPU and a CUDA backend); this
module adds the parts PyTorch wants in Python: fake (meta) implementations so
torch.compile and torch.export can trace the ops, and the autograd formula.

Ops (torch.ops.vggbench):
  conv_bn_act           functional forward -> (out, mean, var)
  conv_bn_act_backward  its gradients
  update_running_stats_ BatchNorm2d's running-statistics update (mutates its inputs)
  conv_stats, bn_act, conv_bn_act_backward_sums
                        training-mode BN split where ranks merge statistics and sums
                        (synchronised BN: vggbench.models.sync_fused)
"""

from __future__ import annotations

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

# The differentiable inputs, in the order conv_bn_act_backward returns their gradients.
GRAD_INPUTS = ("input", "weight", "bias", "bn_weight", "bn_bias", "residual")


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The layout the op computes in (csrc/fused_unit.cpp uses the same rule)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
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
    buffers and statistics stay float32.
    """
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
        torch.ops.vggbench.update_running_stats_(
            running_mean, running_var, num_batches_tracked, mean, var, out.numel() // out.shape[1], momentum
        )
    return out


# --- fake implementations: output metadata only, for torch.compile / torch.export -----------
@torch.library.register_fake("vggbench::conv_bn_act")
def _conv_bn_act_fake(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
    stride, padding, use_batch_stats, eps, negative_slope,
):
    n, _, height, width = input.shape
    channels, _, kh, kw = weight.shape
    shape = (n, channels, (height + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format_of(input))
    stats = (channels if bn_weight is not None else 0,)
    dtype = stats_dtype(input.dtype)
    return out, input.new_empty(stats, dtype=dtype), input.new_empty(stats, dtype=dtype)


@torch.library.register_fake("vggbench::conv_bn_act_backward")
def _conv_bn_act_backward_fake(
    grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
    stride, padding, use_batch_stats, eps, negative_slope, output_mask, reduced_sums=None, reduced_count=0,
):
    def grad(wanted: bool, like: Tensor | None) -> Tensor:
        if like is None:
            return input.new_empty((0,))
        if not wanted:
            return like.new_empty((0,))
        return torch.empty_like(like, memory_format=memory_format_of(like))

    params = (input, weight, bias, bn_weight, bn_bias, residual)
    return tuple(grad(wanted, like) for wanted, like in zip(output_mask, params))


@torch.library.register_fake("vggbench::conv_stats")
def _conv_stats_fake(input, weight, bias, stride, padding):
    z, mean, var = _conv_bn_act_fake(input, weight, bias, weight, None, None, None, None, stride, padding, True, 0.0, 0.0)
    return z, mean, var


@torch.library.register_fake("vggbench::bn_act")
def _bn_act_fake(z, mean, var, bn_weight, bn_bias, residual, eps, negative_slope):
    return torch.empty_like(z, memory_format=memory_format_of(z))


@torch.library.register_fake("vggbench::conv_bn_act_backward_sums")
def _conv_bn_act_backward_sums_fake(grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
                                    stride, padding, eps, negative_slope):
    return mean.new_empty((2 * weight.shape[0],))


@torch.library.register_fake("vggbench::update_running_stats_")
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, count, momentum):
    return None


# --- autograd ------------------------------------------------------------------------
# Positions of the differentiable inputs in the conv_bn_act schema.
_GRAD_POSITIONS = (0, 1, 2, 3, 4, 7)
_NUM_INPUTS = 13


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, bn_weight, bn_bias, _, _, residual = inputs[:8]
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    # The output and the input: nothing else activation-sized (residual is another
    # layer's input or output, saved there anyway).
    ctx.save_for_backward(out, input, weight, bias, bn_weight, bn_bias, residual, mean, var)
    ctx.options = tuple(inputs[8:])  # stride, padding, use_batch_stats, eps, negative_slope


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    out, input, weight, bias, bn_weight, bn_bias, residual, mean, var = ctx.saved_tensors
    mask = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
    grads = torch.ops.vggbench.conv_bn_act_backward(
        grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var, *ctx.options, mask
    )
    result: list[Tensor | None] = [None] * _NUM_INPUTS
    for position, wanted, grad in zip(_GRAD_POSITIONS, mask, grads):
        result[position] = grad if wanted else None
    return tuple(result)


torch.library.register_autograd("vggbench::conv_bn_act", _backward, setup_context=_setup_context)
