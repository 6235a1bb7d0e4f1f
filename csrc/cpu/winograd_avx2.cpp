// The Winograd kernels (winograd_simd.h) for AVX2 + FMA: 8 floats per register, 6x16
// register tile for the matrix products (12 of the 16 registers accumulate).
#include "winograd_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx2,fma")

namespace vggbench::cpu::winograd {
namespace {

struct V {
  using type = __m256;
  static constexpr int kWidth = 8, kRows = 6;
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  static type set1(float a) { return _mm256_set1_ps(a); }
  static type zero() { return _mm256_setzero_ps(); }
  static type add(type x, type y) { return _mm256_add_ps(x, y); }
  static type sub(type x, type y) { return _mm256_sub_ps(x, y); }
  static type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  // v where keep, else 0, without a branch
  static type keep_if(type v, bool keep) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(-static_cast<int>(keep))));
  }
};

#include "winograd_simd.h"

}  // namespace

const Kernels kAvx2Kernels{V::kWidth, &conv_blocks, &weight_grad_chunk};

}  // namespace vggbench::cpu::winograd
#endif
