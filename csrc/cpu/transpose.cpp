// Layout copies in 8x8 register blocks (see transpose.h). Each image of N is a matrix, R rows
// of S values, copied as its transpose: NCHW -> NHWC is (C, H*W) -> (H*W, C), and back.
#include "transpose.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define VGGBENCH_TRANSPOSE_SIMD 1
#else
#define VGGBENCH_TRANSPOSE_SIMD 0
#endif

namespace vggbench::cpu {
namespace {

constexpr int64_t kBlock = 8;
// Columns per task: 8 source rows of up to 1 KB each, read in order, their 8-value columns
// written as 32-byte (float32) or 16-byte (bfloat16) rows of the destination.
constexpr int64_t kTaskColumns = 256;

#if VGGBENCH_TRANSPOSE_SIMD
// d[j * ds + i] = s[i * ss + j] for i, j < 8, 32-bit values.
__attribute__((target("avx2"))) void block_avx2(const void* source, int64_t ss, void* destination, int64_t ds) {
  const auto* s = static_cast<const float*>(source);
  auto* d = static_cast<float*>(destination);
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then 4-7
    __m256* u = t + 4 * h;
    r[4 * h] = _mm256_shuffle_ps(u[0], u[2], 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(u[0], u[2], 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(u[1], u[3], 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(u[1], u[3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(d + j * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(d + (j + 4) * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

// The same for 16-bit values (SSE2, which every x86-64 CPU has).
void block_sse2(const void* source, int64_t ss, void* destination, int64_t ds) {
  const auto* s = static_cast<const uint16_t*>(source);
  auto* d = static_cast<uint16_t*>(destination);
  __m128i r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ss));
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    const __m128i* u = t + h;  // u[0], u[2], u[4], u[6]: the pairs of rows' low (h 0) or high halves
    r[4 * h] = _mm_unpacklo_epi32(u[0], u[2]);
    r[4 * h + 1] = _mm_unpackhi_epi32(u[0], u[2]);
    r[4 * h + 2] = _mm_unpacklo_epi32(u[4], u[6]);
    r[4 * h + 3] = _mm_unpackhi_epi32(u[4], u[6]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 2; ++j) {
      const __m128i lo = r[4 * h + j], hi = r[4 * h + 2 + j];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (4 * h + 2 * j) * ds), _mm_unpacklo_epi64(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (4 * h + 2 * j + 1) * ds), _mm_unpackhi_epi64(lo, hi));
    }
  }
}
#endif

using Block = void (*)(const void*, int64_t, void*, int64_t);

// The block kernel for values of `size` bytes on this CPU; null: none.
Block block_for(size_t size) {
#if VGGBENCH_TRANSPOSE_SIMD
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (size == 4 && avx2) return &block_avx2;
  if (size == 2) return &block_sse2;
#endif
  (void)size;
  return nullptr;
}

// Per image, dst (S, R) = transpose of src (R, S), values of `size` bytes; whole 8x8 blocks
// by `block`, the rest value by value. Tasks: (image, 8 rows, kTaskColumns columns).
void transpose_images(const char* src, char* dst, int64_t N, int64_t R, int64_t S, size_t size, Block block) {
  const int64_t row_tasks = (R + kBlock - 1) / kBlock, column_tasks = (S + kTaskColumns - 1) / kTaskColumns;
  const int64_t image = R * S * static_cast<int64_t>(size);
  at::parallel_for(0, N * row_tasks * column_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (row_tasks * column_tasks);
      const int64_t i0 = task / column_tasks % row_tasks * kBlock, j0 = task % column_tasks * kTaskColumns;
      const int64_t i1 = std::min(R, i0 + kBlock), j1 = std::min(S, j0 + kTaskColumns);
      const char* s = src + n * image;
      char* d = dst + n * image;
      const auto at = [size](auto* base, int64_t index) { return base + index * static_cast<int64_t>(size); };
      int64_t j = j0;
      if (i1 - i0 == kBlock) {
        for (; j + kBlock <= j1; j += kBlock) block(at(s, i0 * S + j), S, at(d, j * R + i0), R);
      }
      for (; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) std::memcpy(at(d, j * R + i), at(s, i * S + j), size);
      }
    }
  });
}

// t copied into memory format `to`: by transpose_images where a block kernel takes its
// values, else by ATen.
at::Tensor relayout(const at::Tensor& t, at::MemoryFormat from, at::MemoryFormat to) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && t.is_contiguous(from));
  const Block block = t.is_cpu() ? block_for(t.element_size()) : nullptr;
  const int64_t pixels = t.size(2) * t.size(3);
  // ATen's copy where few values would go through blocks (3-channel images took 10x as long)
  if (block == nullptr || (t.scalar_type() != at::kFloat && t.scalar_type() != at::kBFloat16) ||
      t.size(1) < kBlock || pixels < kBlock) {
    return t.contiguous(to);
  }
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(to));
  const int64_t N = t.size(0), C = t.size(1), P = pixels;
  const bool to_channels_last = to == at::MemoryFormat::ChannelsLast;
  transpose_images(static_cast<const char*>(t.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()), N,
                   to_channels_last ? C : P, to_channels_last ? P : C, t.element_size(), block);
  return out;
}

}  // namespace

at::Tensor channels_last_copy(const at::Tensor& t) {
  return relayout(t, at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast);
}

at::Tensor contiguous_copy(const at::Tensor& t) {
  return relayout(t, at::MemoryFormat::ChannelsLast, at::MemoryFormat::Contiguous);
}

}  // namespace vggbench::cpu
