// Winograd F(4x4, 3x3) convolutions for the CPU: the 3x3, stride-1, padding-1 convs of
// the study in float32 channels_last, forward and weight gradient (the input gradient is
// the forward conv of the flipped, transposed weights). On AVX2+FMA CPUs only; callers
// fall back to ATen when `winograd_applies` says no.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace vggbench::cpu {

// True when x (N, C, H, W) and weight (K, C, kH, kW) form a conv these kernels compute:
// float32, x channels_last-contiguous, 3x3 kernel, stride 1, padding 1, C and K
// multiples of 8, and an AVX2+FMA CPU.
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding);

// conv2d(x, weight, bias, stride=1, padding=1), channels_last. `transposed_weight`: use
// weight (C, K, 3, 3) flipped and transposed, i.e. compute the input gradient of a conv
// whose weight is `weight` from its output gradient x.
at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed_weight);

// The weight gradient of conv2d(x, W, stride=1, padding=1) given its output gradient
// grad (N, K, H, W), both channels_last: shape (K, C, 3, 3), contiguous. Deterministic.
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad);

}  // namespace vggbench::cpu
