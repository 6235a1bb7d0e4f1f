// The CPU passes (fused_unit_passes.h) compiled for AVX2; fused_unit_kernel.cpp uses them
// where the CPU has AVX2.
#define VGGBENCH_CPU_PASSES_AVX2
#include "fused_unit_passes.h"

namespace vggbench::cpu {

Kernels with_avx2_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward) {
  return with_passes(conv, conv_backward);
}

}  // namespace vggbench::cpu
