// The Winograd kernels (winograd_simd.h) for AVX-512 F/BW/VL: 16 floats per register,
// 9x32 register tile for the conv products (18 of the 32 registers accumulate; 9 rows
// divide the 18-tile blocks evenly), 8x32 for the weight gradient's (16 accumulate; its 8
// channels lie in one register's group of 16).
#include "winograd_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

// prfchw: PREFETCHW, the prefetch for writing (a no-op on the CPUs that lack it)
#ifdef VGGBENCH_EMULATE_AVX512
#pragma GCC target("avx2,fma,prfchw")  // the emulated build: V below, in pairs of AVX2 registers
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,prfchw")
#endif
// GCC 12 flags the deliberately undefined pass-through operand of unmasked AVX-512 integer
// intrinsics (_mm512_undefined_epi32) as "may be used uninitialized": a false positive
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace vggbench::cpu::winograd {
namespace {

#ifdef VGGBENCH_EMULATE_AVX512
// The emulated AVX-512 build (a test build for CPUs without AVX-512; VGGBENCH_EMULATE_AVX512):
// V with AVX-512's width and register tiles, each 16-float register a pair of AVX2 registers,
// each operation the AVX2 build's on both halves (the same bits lane by lane).
#include "winograd_avx2_v.h"
struct V {
  struct type {
    __m256 lo, hi;
  };
  static constexpr int kWidth = 16, kRows = 9, kGradRows = 8;
  template <typename F>
  static type both(F f, type x, type y) { return {f(x.lo, y.lo), f(x.hi, y.hi)}; }
  template <typename T>  // float, or bfloat16 bits (uint16_t)
  static type load(const T* p) { return {Avx2::load(p), Avx2::load(p + 8)}; }
  template <typename T>
  static void store(T* p, type v) { Avx2::store(p, v.lo), Avx2::store(p + 8, v.hi); }
  static type set1(float a) { return {Avx2::set1(a), Avx2::set1(a)}; }
  static type zero() { return {Avx2::zero(), Avx2::zero()}; }
  static type add(type x, type y) { return both(Avx2::add, x, y); }
  static type sub(type x, type y) { return both(Avx2::sub, x, y); }
  static type fmadd(type a, type b, type c) { return {Avx2::fmadd(a.lo, b.lo, c.lo), Avx2::fmadd(a.hi, b.hi, c.hi)}; }
  static type mul(type x, type y) { return both(Avx2::mul, x, y); }
  static type leaky_relu(type v, type slope) { return both(Avx2::leaky_relu, v, slope); }
  static type keep_if(type v, bool keep) { return {Avx2::keep_if(v.lo, keep), Avx2::keep_if(v.hi, keep)}; }
  static void add_to(double* acc, type v) { Avx2::add_to(acc, v.lo), Avx2::add_to(acc + 8, v.hi); }
};
#else
struct V {
  using type = __m512;
  static constexpr int kWidth = 16, kRows = 9, kGradRows = 8;
  static type load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, type v) { _mm512_storeu_ps(p, v); }
  // bfloat16: its bits are a float's upper half
  static type load(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  // rounded to nearest even, NaN to 0x7fc0: c10::BFloat16's rounding, bit for bit
  static void store(uint16_t* p, type v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
  }
  static type set1(float a) { return _mm512_set1_ps(a); }
  static type zero() { return _mm512_setzero_ps(); }
  static type add(type x, type y) { return _mm512_add_ps(x, y); }
  static type sub(type x, type y) { return _mm512_sub_ps(x, y); }
  static type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  // x * y, rounded on its own: the empty asm keeps the compiler from contracting it with an
  // add into an FMA (normalize_act's maths, whose bits the conv's activation matches, has none)
  static type mul(type x, type y) {
    type product = _mm512_mul_ps(x, y);
    asm("" : "+v"(product));
    return product;
  }
  // v > 0 ? v : v * slope (math::leaky_relu: NaN gives v * slope)
  static type leaky_relu(type v, type slope) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_mul_ps(v, slope), v);
  }
  // v where keep, else 0, without a branch
  static type keep_if(type v, bool keep) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(-static_cast<int>(keep)), v);
  }
  // acc[l] += lane l, in double
  static void add_to(double* acc, type v) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
    _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), _mm512_cvtps_pd(high)));
  }
};
#endif

#include "winograd_simd.h"

}  // namespace

const Kernels kAvx512Kernels{V::kWidth, {&conv_blocks<float>, &weight_grad_blocks<float>},
                             {&conv_blocks<uint16_t>, &weight_grad_blocks<uint16_t>}};

}  // namespace vggbench::cpu::winograd
#endif
