// CPU backend of the fused unit (see ../fused_unit.h): the passes over activations
// (fused_unit_passes.h, in the widest build the CPU has), and the convs: 3x3 stride-1
// ones in float32, and in bfloat16 where ATen's bfloat16 convs do not run on AMX, as Winograd
// F(4x4, 3x3) (winograd.h; contiguous ones through channels_last copies), others through ATen
// (in float32 for bfloat16 where ATen's bfloat16 conv has no bfloat16 dot products).
#include "fused_unit_passes.h"
#include "transpose.h"
#include "winograd.h"

#include <ATen/ops/sum.h>
#include <torch/library.h>

namespace vggbench {
namespace cpu {
// fused_unit_kernel_avx2.cpp, _avx512.cpp: with_passes of the AVX2 and AVX-512 builds.
Kernels with_avx2_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward);
Kernels with_avx512_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward);
}  // namespace cpu

namespace {

// Whether a bfloat16 conv that ATen computes runs in float32 instead: where ATen's bfloat16
// conv lacks bfloat16 dot products (cpu::native_bf16_dot_products), so that bfloat16 is not
// slower than float32. Sums are in float32 either way, rounded once to bfloat16.
bool widened(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && !cpu::native_bf16_dot_products();
}

Tensor float32_of(const Tensor& t) { return t.to(at::kFloat); }

// How a conv takes the Winograd kernels, which read and write channels_last only: its
// operands as they are, or, when contiguous (NCHW), channels_last copies of them, its outputs
// copied back (cpu/transpose.h: the copies cost far less than ATen's NCHW conv takes over
// Winograd's).
struct WinogradLayout {
  bool copies;
  Tensor in(const Tensor& t) const { return copies ? cpu::channels_last_copy(t) : t; }
  Tensor out(const Tensor& t) const { return copies ? cpu::contiguous_copy(t) : t; }
};

// nullopt: the Winograd kernels do not compute conv2d(x, weight).
std::optional<WinogradLayout> winograd_layout(const Tensor& x, const Tensor& weight, int64_t stride,
                                              int64_t padding) {
  if (cpu::winograd_applies(x, weight, stride, padding)) return WinogradLayout{false};
  if (x.dim() == 4 && x.is_contiguous() && cpu::winograd_applies_channels_last(x, weight, stride, padding)) {
    return WinogradLayout{true};
  }
  return std::nullopt;
}

// The passes' conv_stats and conv_act (the 3-channel entry conv as a direct conv), in the
// build in use: set with kCpuKernels below.
decltype(Kernels::conv_stats) direct_conv_stats = nullptr;
decltype(Kernels::conv_act) direct_conv_act = nullptr;

Tensor conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
            int64_t padding) {
  if (const auto layout = winograd_layout(x, weight, stride, padding)) {
    return layout->out(cpu::winograd_conv(layout->in(x), weight, bias, /*transposed_weight=*/false));
  }
  // (its statistics dropped: the forward's bits for eval and the backward's recompute)
  if (auto direct = direct_conv_stats(x, weight, bias, stride, padding)) return std::get<0>(*direct);
  if (widened(x)) {
    const OptTensor b = bias ? OptTensor(float32_of(*bias)) : std::nullopt;
    return aten_conv(float32_of(x), float32_of(weight), b, stride, padding).to(x.scalar_type());
  }
  return aten_conv(x, weight, bias, stride, padding);
}

// The Winograd conv, or the passes' entry conv, with batch_stats taken from its output as it
// is written (no pass over z); other convs: nullopt (conv, then batch_stats).
std::optional<std::tuple<Tensor, Tensor, Tensor>> conv_stats(const Tensor& x, const Tensor& weight,
                                                             const OptTensor& bias, int64_t stride,
                                                             int64_t padding) {
  const auto layout = winograd_layout(x, weight, stride, padding);
  if (!layout) return direct_conv_stats(x, weight, bias, stride, padding);
  RECORD_FUNCTION("vggbench::conv", {});  // one scope, as the orchestration's conv (with its copies)
  cpu::ChannelSums sums;
  Tensor z = cpu::winograd_conv_sums(layout->in(x), weight, sums);
  auto [mean, var] =
      stats_from_sums(sums.sum.data(), sums.sum_sq.data(), sums.shift.data(), geometry_of(z).count(), bias, z);
  return std::tuple{layout->out(z), mean, var};
}

// The Winograd conv, or the passes' entry conv, normalised and activated as its outputs are
// written (no pass over z; normalize_act's bits); other convs: nullopt.
std::optional<Tensor> conv_act(const Tensor& x, const Tensor& weight, int64_t stride, int64_t padding,
                               const ChannelAffine& affine, double slope) {
  const auto layout = winograd_layout(x, weight, stride, padding);
  if (!layout) return direct_conv_act(x, weight, stride, padding, affine, slope);
  RECORD_FUNCTION("vggbench::conv", {});  // one scope, as the orchestration's conv (with its copies)
  // normalize_act's coefficients, float for float32 and bfloat16 activations alike
  const auto [scale, shift] = x.scalar_type() == at::kBFloat16
                                  ? affine_coefficients<at::BFloat16>(affine, weight.size(0))
                                  : affine_coefficients<float>(affine, weight.size(0));
  const bool normalise = affine.transforms();
  return layout->out(cpu::winograd_conv_act(layout->in(x), weight, normalise ? scale.data() : nullptr,
                                            normalise ? shift.data() : nullptr, static_cast<float>(slope)));
}

// ATen's conv backward, except where it gets the weight gradient wrong: a strided 1x1 conv
// without padding in channels_last (torch 2.14's oneDNN path: with 2 to 7 input channels,
// errors of 10-100% that change from call to call, and on one thread a corrupted heap; the
// bias's gradient alone runs the same code), whose weight and bias gradients come from
// contiguous copies instead, which ATen gets right.
std::tuple<Tensor, Tensor, Tensor> checked_aten_conv_backward(const Tensor& grad_z, const Tensor& x,
                                                              const Tensor& weight, bool has_bias, int64_t stride,
                                                              int64_t padding, std::array<bool, 3> mask) {
  const bool strided_pointwise = weight.size(2) == 1 && weight.size(3) == 1 && stride > 1 && padding == 0;
  if (!(mask[1] || mask[2]) || !strided_pointwise || x.is_contiguous()) {
    return aten_conv_backward(grad_z, x, weight, has_bias, stride, padding, mask);
  }
  Tensor grad_x;
  if (mask[0]) grad_x = std::get<0>(aten_conv_backward(grad_z, x, weight, false, stride, padding, {true, false, false}));
  auto [unused, grad_w, grad_b] = aten_conv_backward(grad_z.contiguous(), x.contiguous(), weight.contiguous(),
                                                     has_bias, stride, padding, {false, mask[1], mask[2]});
  return {grad_x, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad_z, const Tensor& x,
                                                 const Tensor& weight, bool has_bias,
                                                 int64_t stride, int64_t padding,
                                                 std::array<bool, 3> mask) {
  const auto layout = winograd_layout(x, weight, stride, padding);
  const auto grad_layout = winograd_layout(grad_z, weight.transpose(0, 1), stride, padding);
  if (!layout || !grad_layout || layout->copies != grad_layout->copies) {
    if (!widened(x)) return checked_aten_conv_backward(grad_z, x, weight, has_bias, stride, padding, mask);
    auto [grad_x, grad_w, grad_b] = checked_aten_conv_backward(float32_of(grad_z), float32_of(x), float32_of(weight),
                                                               has_bias, stride, padding, mask);
    const auto to = [](const Tensor& grad, const Tensor& like) {
      return grad.defined() ? grad.to(like.scalar_type()) : grad;
    };
    return {to(grad_x, x), to(grad_w, weight), to(grad_b, grad_z)};
  }
  const Tensor g = layout->in(grad_z);
  // the input gradient is the conv of grad_z with the flipped, transposed weight
  return {mask[0] ? layout->out(cpu::winograd_conv(g, weight, std::nullopt, /*transposed_weight=*/true)) : Tensor(),
          mask[1] ? cpu::winograd_weight_grad(layout->in(x), g) : Tensor(),
          mask[2] && has_bias ? at::sum(grad_z, {0, 2, 3}) : Tensor()};
}

// The passes' build for the widest instruction set the Winograd kernels use (the CPU's,
// capped by VGGBENCH_CPU_ISA); every build gives the same bits. A bad VGGBENCH_CPU_ISA is
// reported by the first Winograd conv, not here (this runs when the library loads).
Kernels cpu_kernels() {
  cpu::Isa isa = cpu::Isa::kNone;
  try {
    isa = cpu::winograd_isa();
  } catch (const c10::Error&) {
    isa = __builtin_cpu_supports("avx2") ? cpu::Isa::kAvx2 : cpu::Isa::kNone;
  }
  Kernels kernels;
  switch (isa) {
    case cpu::Isa::kAvx512:
      kernels = cpu::with_avx512_passes(&conv, &conv_backward);
      break;
    case cpu::Isa::kAvx2:
      kernels = cpu::with_avx2_passes(&conv, &conv_backward);
      break;
    default:
      kernels = with_passes(&conv, &conv_backward);
  }
  direct_conv_stats = kernels.conv_stats;
  kernels.conv_stats = &conv_stats;
  direct_conv_act = kernels.conv_act;
  kernels.conv_act = &conv_act;
  return kernels;
}

const Kernels kCpuKernels = cpu_kernels();

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CPU, m) { vggbench::register_backend(m, vggbench::kCpuKernels); }
