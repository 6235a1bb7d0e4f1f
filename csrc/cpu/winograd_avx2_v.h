// The AVX2 + FMA operations of the Winograd kernels (winograd_simd.h's V, less its tile
// constants): included inside the namespace of winograd_avx2.cpp, and of winograd_avx512.cpp's
// emulated build, after <immintrin.h> and their target pragmas. (No include guard: included
// once per file.)

struct Avx2 {
  using type = __m256;
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  // bfloat16: its bits are a float's upper half
  static type load(const uint16_t* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  // rounded to nearest even, NaN to 0x7fc0: c10::BFloat16's rounding, bit for bit
  static void store(uint16_t* p, type v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static type set1(float a) { return _mm256_set1_ps(a); }
  static type zero() { return _mm256_setzero_ps(); }
  static type add(type x, type y) { return _mm256_add_ps(x, y); }
  static type sub(type x, type y) { return _mm256_sub_ps(x, y); }
  static type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  // x * y, rounded on its own: the empty asm keeps the compiler from contracting it with an
  // add into an FMA (normalize_act's maths, whose bits the conv's activation matches, has none)
  static type mul(type x, type y) {
    type product = _mm256_mul_ps(x, y);
    asm("" : "+v"(product));
    return product;
  }
  // v > 0 ? v : v * slope (math::leaky_relu: NaN gives v * slope)
  static type leaky_relu(type v, type slope) {
    return _mm256_blendv_ps(_mm256_mul_ps(v, slope), v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
  }
  // v where keep, else 0, without a branch
  static type keep_if(type v, bool keep) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(-static_cast<int>(keep))));
  }
  // acc[l] += lane l, in double
  static void add_to(double* acc, type v) {
    _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
    _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  }
};
