// Winograd F(4x4, 3x3) convolutions for the CPU: the 3x3, stride-1, padding-1 convs of
// the study in channels_last, forward and weight gradient (the input gradient is the forward
// conv of the flipped, transposed weights), for float32 and bfloat16 activations (bfloat16:
// widened to float32 on load, float32 transforms and products, outputs rounded once).
// Kernels for AVX2+FMA and for AVX-512 F/BW/VL, chosen at run time by what the CPU has
// (VGGBENCH_CPU_ISA=avx2 forces AVX2); callers fall back to ATen when `winograd_applies`
// says no.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace vggbench::cpu {

// The instruction sets the kernels are written for, narrowest first.
enum class Isa { kNone, kAvx2, kAvx512 };

// "none", "avx2" or "avx512".
const char* isa_name(Isa isa);

// The widest set this CPU has (kNone: no AVX2+FMA), capped by the environment variable
// VGGBENCH_CPU_ISA ("avx2" or "avx512"; read once, on the first call). Throws on a value
// it does not know or a set this CPU lacks.
Isa winograd_isa();

// True when x (N, C, H, W) and weight (K, C, kH, kW) form a conv these kernels compute:
// float32, or bfloat16 unless ATen's bfloat16 convs run on AMX (several times faster there
// than these kernels' float32 arithmetic); x and weight of one dtype, x channels_last-
// contiguous and not empty, 3x3 kernel, stride 1, padding 1, C and K multiples of 8, and an
// AVX2+FMA CPU. (The 3-channel entry conv stays with ATen: zero-padded to 8 channels,
// Winograd took 2.5-5x ATen's direct conv; a direct im2col kernel, 1.2-1.9x.)
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding);

// Whether winograd_applies to a channels_last copy of x (x in any layout).
bool winograd_applies_channels_last(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                    int64_t padding);

// Whether the kernels take bfloat16 activations on this CPU: an AVX2+FMA CPU whose ATen
// bfloat16 convs do not run on AMX (several times faster there than these kernels' float32
// arithmetic).
bool winograd_takes_bfloat16();

// Whether ATen's bfloat16 convs have bfloat16 dot products here: oneDNN is enabled
// (torch.backends.mkldnn) and may use AVX512-BF16 or AMX-BF16 on this CPU (ONEDNN_MAX_CPU_ISA
// not capping it below them). Without them ATen's bfloat16 conv is slower than its float32
// one: 2x with AVX-512 F/BW/VL alone, 10-18x on an AVX2 CPU (a direct conv; 3->32 entry conv,
// N=100, 32x32 and 8x8, 2 threads).
bool native_bf16_dot_products();

// conv2d(x, weight, bias, stride=1, padding=1), channels_last. `transposed_weight`: use
// weight (C, K, 3, 3) flipped and transposed, i.e. compute the input gradient of a conv
// whose weight is `weight` from its output gradient x. `isa`: the kernels to use (at most
// winograd_isa(); narrower where the channel counts do not fit its registers). The output
// has x's dtype; a bias is converted to float32.
at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed_weight,
                         Isa isa = winograd_isa());

// What batch statistics need of a conv's output z, per output channel k, from
// winograd_conv_sums: the sums over z's values (as stored) of z - shift[k] and of its
// square, in float64 (each tile's 16 values summed in float, the tiles and then the blocks
// of tiles added in order: the same for any thread count), with shift[k] near the channel's
// values (z at the first pixel, computed directly), so that the squares carry no
// cancellation when |mean| >> std.
struct ChannelSums {
  std::vector<double> shift, sum, sum_sq;
};

// winograd_conv(x, weight, no bias) and its output's ChannelSums, in one pass.
at::Tensor winograd_conv_sums(const at::Tensor& x, const at::Tensor& weight, ChannelSums& sums,
                              Isa isa = winograd_isa());

// winograd_conv(x, weight, no bias) with each output y stored as leaky_relu(y * scale[k] +
// shift[k], slope) (normalize_act's maths on y as stored; scale and shift: K floats each, or
// both null: leaky_relu(y, slope)), in one pass.
at::Tensor winograd_conv_act(const at::Tensor& x, const at::Tensor& weight, const float* scale,
                             const float* shift, float slope, Isa isa = winograd_isa());

// The weight gradient of conv2d(x, W, stride=1, padding=1) given its output gradient
// grad (N, K, H, W), both channels_last and of one dtype: shape (K, C, 3, 3), channels_last,
// in that dtype (summed in float32, rounded once). Deterministic.
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad,
                                Isa isa = winograd_isa());

}  // namespace vggbench::cpu
