// The CPU passes (fused_unit_passes.h) compiled for AVX-512 F/BW/VL; fused_unit_kernel.cpp
// uses them where the CPU has those.
#define VGGBENCH_CPU_PASSES_AVX512
#include "fused_unit_passes.h"

namespace vggbench::cpu {

Kernels with_avx512_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward) {
  return with_passes(conv, conv_backward);
}

}  // namespace vggbench::cpu
