// The Winograd convs as ops of their own, for tests and benchmarks of each instruction set
// (the fused unit calls them directly, with winograd_isa()):
//   torch.ops.vggbench.winograd_isa() -> "avx512" | "avx2" | "none"
//   torch.ops.vggbench.winograd_takes_bfloat16() -> bool (not on a CPU with AMX-BF16)
//   torch.ops.vggbench.native_bf16_dot_products() -> bool (ATen's bfloat16 convs have them)
//   torch.ops.vggbench.winograd_conv(x, weight, bias, transposed_weight, isa)
//   torch.ops.vggbench.winograd_weight_grad(x, grad, isa)
#include "winograd.h"

#include <torch/library.h>

#include <string>

namespace vggbench::cpu {
namespace {

Isa parse_isa(const std::string& name) {
  for (const Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK(false, "isa must be avx2 or avx512, got '", name, "'");
}

// x or grad: float32 or bfloat16, CPU, (N, C, H, W) channels_last, not empty, C a multiple of 8.
void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) && t.dim() == 4 && t.numel() > 0 && t.size(1) % 8 == 0 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              name, " must be a non-empty float32 or bfloat16 CPU tensor (N, C, H, W), channels_last, C a multiple of 8; got ",
              t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

at::Tensor conv_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   bool transposed_weight, const std::string& isa) {
  check_activation(x, "x");
  const at::Tensor w = transposed_weight ? weight.transpose(0, 1) : weight;  // (out, in, 3, 3)
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && w.dim() == 4 && w.size(1) == x.size(1) && w.size(0) % 8 == 0 &&
                  w.size(2) == 3 && w.size(3) == 3,
              "weight must be of x's dtype, (K, C, 3, 3) (transposed: (C, K, 3, 3)) with C = x's ", x.size(1),
              " channels and K a multiple of 8; got ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type()),
              "bias must be of x's dtype and shape (", w.size(0), ")");
  return winograd_conv(x, weight, bias, transposed_weight, parse_isa(isa));
}

at::Tensor weight_grad_op(const at::Tensor& x, const at::Tensor& grad, const std::string& isa) {
  check_activation(x, "x");
  check_activation(grad, "grad");
  TORCH_CHECK(x.size(0) == grad.size(0) && x.size(2) == grad.size(2) && x.size(3) == grad.size(3) &&
                  x.scalar_type() == grad.scalar_type(),
              "x ", x.sizes(), " ", x.scalar_type(), " and grad ", grad.sizes(), " ", grad.scalar_type(),
              " must have the same N, H, W and dtype");
  return winograd_weight_grad(x, grad, parse_isa(isa));
}

std::string isa_op() { return isa_name(winograd_isa()); }

}  // namespace
}  // namespace vggbench::cpu

TORCH_LIBRARY_FRAGMENT(vggbench, m) {
  m.def("winograd_isa() -> str", &vggbench::cpu::isa_op);
  m.def("winograd_takes_bfloat16() -> bool", &vggbench::cpu::winograd_takes_bfloat16);
  m.def("native_bf16_dot_products() -> bool", &vggbench::cpu::native_bf16_dot_products);
  m.def("winograd_conv(Tensor x, Tensor weight, Tensor? bias, bool transposed_weight, str isa) -> Tensor");
  m.def("winograd_weight_grad(Tensor x, Tensor grad, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(vggbench, CPU, m) {
  m.impl("winograd_conv", &vggbench::cpu::conv_op);
  m.impl("winograd_weight_grad", &vggbench::cpu::weight_grad_op);
}
