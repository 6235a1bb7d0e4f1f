// The Winograd kernels (winograd_simd.h) for AVX2 + FMA: 8 floats per register, 6x16
// register tile for the conv products, 4x16 for the weight gradient's (12 and 8 of the 16
// registers accumulate; the latter's 4 channels lie in one register's group of 8).
#include "winograd_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

// prfchw: PREFETCHW, the prefetch for writing (a no-op on the CPUs that lack it)
#pragma GCC target("avx2,fma,prfchw")

namespace vggbench::cpu::winograd {
namespace {

#include "winograd_avx2_v.h"
struct V : Avx2 {
  static constexpr int kWidth = 8, kRows = 6, kGradRows = 4;
};

#include "winograd_simd.h"

}  // namespace

const Kernels kAvx2Kernels{V::kWidth, {&conv_blocks<float>, &weight_grad_blocks<float>},
                            {&conv_blocks<uint16_t>, &weight_grad_blocks<uint16_t>}};

}  // namespace vggbench::cpu::winograd
#endif
