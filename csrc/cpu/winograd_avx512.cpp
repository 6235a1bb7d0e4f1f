// The Winograd kernels (winograd_simd.h) for AVX-512 F/BW/VL: 16 floats per register,
// 9x32 register tile for the matrix products (18 of the 32 registers accumulate; 9 rows
// divide the 18-tile blocks evenly).
#include "winograd_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

namespace vggbench::cpu::winograd {
namespace {

struct V {
  using type = __m512;
  static constexpr int kWidth = 16, kRows = 9;
  static type load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, type v) { _mm512_storeu_ps(p, v); }
  static type set1(float a) { return _mm512_set1_ps(a); }
  static type zero() { return _mm512_setzero_ps(); }
  static type add(type x, type y) { return _mm512_add_ps(x, y); }
  static type sub(type x, type y) { return _mm512_sub_ps(x, y); }
  static type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  // v where keep, else 0, without a branch
  static type keep_if(type v, bool keep) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(-static_cast<int>(keep)), v);
  }
};

#include "winograd_simd.h"

}  // namespace

const Kernels kAvx512Kernels{V::kWidth, &conv_blocks, &weight_grad_chunk};

}  // namespace vggbench::cpu::winograd
#endif
