// Winograd F(4x4, 3x3) for the CPU (see winograd.h). Each 4x4 block of outputs (a tile)
// comes from a 6x6 block of inputs; in the transformed domain the conv becomes 36
// independent (tiles x C) @ (C x K) matrix products, 4x fewer multiplications than the
// direct conv. Tiles are processed in blocks small enough that their transformed inputs,
// products and the transformed weights stay in L2; channels are innermost (NHWC), so every
// transform is 8 channels wide in one AVX register.
//
// Interpolation points 0, 1, -1, 1/2, -2 (and infinity) rather than the usual +-1, +-2:
// their float32 error is within ~1.3x of the direct conv's (the usual points: ~5x).
#include "winograd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define VGGBENCH_WINOGRAD 1
#include <immintrin.h>
#else
#define VGGBENCH_WINOGRAD 0
#endif

namespace vggbench::cpu {
namespace {

constexpr double kThird = 1.0 / 3, kFifteenth = 1.0 / 15;
// The weight transform G (6x3); the input transform B^T (6x6) and the output transform
// A^T (4x6) are spelled out in input_1d and output_1d below.
constexpr double kG[6][3] = {{1, 0, 0},
                             {kThird, kThird, kThird},
                             {-kThird, kThird, -kThird},
                             {-16 * kFifteenth, -8 * kFifteenth, -4 * kFifteenth},
                             {kFifteenth, -2 * kFifteenth, 4 * kFifteenth},
                             {0, 0, 1}};

constexpr int kTile = 4, kWindow = 6, kPoints = kWindow * kWindow;
constexpr int64_t kBlockTiles = 18;  // tiles per block: transforms + products ~300 KB for C=K=32
constexpr int64_t kChunkBlocks = 16;  // blocks per weight-gradient partial sum

// The tiles of an (N, H, W) output: tile t covers rows 4*ty.. and columns 4*tx.. of image n.
struct Tiles {
  int64_t n, h, w, rows, cols;
  int64_t count() const { return n * rows * cols; }
  void locate(int64_t t, int64_t& image, int64_t& top, int64_t& left) const {
    image = t / (rows * cols);
    const int64_t r = t % (rows * cols);
    top = (r / cols) * kTile, left = (r % cols) * kTile;
  }
};

Tiles tiles_of(const at::Tensor& t) {
  const int64_t h = t.size(2), w = t.size(3);
  return {t.size(0), h, w, (h + kTile - 1) / kTile, (w + kTile - 1) / kTile};
}

// U[a*6+b][c][k] = (G w G^T)[a][b] for each 3x3 filter w from channel c to k (double).
std::vector<float> transform_weight(const at::Tensor& weight, bool transposed) {
  const at::Tensor w = weight.contiguous();
  const float* data = w.const_data_ptr<float>();
  const int64_t K = w.size(0), C = w.size(1);
  // the conv's output and input channels: swapped for the transposed (input-gradient) conv
  const int64_t out_ch = transposed ? C : K, in_ch = transposed ? K : C;
  std::vector<float> u(kPoints * in_ch * out_ch);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const float* f = data + (k * C + c) * 9;
      double g[3][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = transposed ? f[(2 - i) * 3 + 2 - j] : f[i * 3 + j];
      const int64_t row = transposed ? k : c, col = transposed ? c : k;
      for (int a = 0; a < kWindow; ++a) {
        for (int b = 0; b < kWindow; ++b) {
          double s = 0;
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) s += kG[a][i] * g[i][j] * kG[b][j];
          u[((a * kWindow + b) * in_ch + row) * out_ch + col] = static_cast<float>(s);
        }
      }
    }
  }
  return u;
}

#if VGGBENCH_WINOGRAD
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256 fma(float a, __m256 x, __m256 y) { return _mm256_fmadd_ps(_mm256_set1_ps(a), x, y); }
inline __m256 add(__m256 x, __m256 y) { return _mm256_add_ps(x, y); }
inline __m256 sub(__m256 x, __m256 y) { return _mm256_sub_ps(x, y); }

// The 1-D transforms, 8 channels at a time; d[i * s] is entry i.
// B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0; 0 -2 -1 2 1 0;
//        0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]
inline void input_1d(const __m256* d, int s, __m256* r, int rs) {
  const __m256 d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
  const __m256 a = sub(d3, d1), b = sub(d4, d2);
  r[0] = fma(1.5f, a, fma(-2.f, d2, add(d0, d4)));
  r[rs] = fma(2.5f, d3, fma(0.5f, d2, sub(d4, d1)));
  r[2 * rs] = fma(0.5f, d3, fma(-2.5f, d2, add(d1, d4)));
  r[3 * rs] = fma(2.f, a, b);
  r[4 * rs] = fma(-0.5f, a, b);
  r[5 * rs] = fma(1.5f, b, fma(-2.f, d3, add(d1, d5)));
}

// A^T = [1 1 1 1 1 0; 0 1 -1 1/2 -2 0; 0 1 1 1/4 4 0; 0 1 -1 1/8 -8 1]
inline void output_1d(const __m256* m, int s, __m256* o, int os) {
  const __m256 m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
  const __m256 sum = add(m1, m2), diff = sub(m1, m2);
  o[0] = add(add(m0, sum), add(m3, m4));
  o[os] = fma(0.5f, m3, fma(-2.f, m4, diff));
  o[2 * os] = fma(0.25f, m3, fma(4.f, m4, sum));
  o[3 * os] = fma(0.125f, m3, fma(-8.f, m4, add(diff, m5)));
}

// A = (A^T)^T: the weight gradient's transform of 4-entry output-gradient rows.
inline void grad_1d(const __m256* e, int s, __m256* r, int rs) {
  const __m256 e0 = e[0], e1 = e[s], e2 = e[2 * s], e3 = e[3 * s];
  const __m256 even = add(e0, e2), odd = add(e1, e3);
  r[0] = e0;
  r[rs] = add(even, odd);
  r[2 * rs] = sub(even, odd);
  r[3 * rs] = fma(0.5f, e1, fma(0.25f, e2, fma(0.125f, e3, e0)));
  r[4 * rs] = fma(-2.f, e1, fma(4.f, e2, fma(-8.f, e3, e0)));
  r[5 * rs] = e3;
}

// out = M in M^T for a 1-D transform M from In to Out entries.
template <int In, int Out, void (*Transform)(const __m256*, int, __m256*, int)>
inline void transform_2d(const __m256 (&in)[In][In], __m256 (&out)[Out][Out]) {
  __m256 rows[Out][In];
  for (int j = 0; j < In; ++j) Transform(&in[0][j], In, &rows[0][j], In);
  for (int i = 0; i < Out; ++i) Transform(&rows[i][0], 1, &out[i][0], 1);
}

// Transformed blocks are laid out [tile][point][channel]: one tile's 36 points are
// contiguous (the transforms write and read them together), and the products of one point
// over the block's tiles are a matrix with row stride kPoints * channels.

// Stores a tile's 36 transformed entries for channels c..c+8.
inline void store_points(const __m256 (&out)[kWindow][kWindow], float* tile, int64_t channels) {
#pragma GCC unroll 6
  for (int i = 0; i < kWindow; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < kWindow; ++j) _mm256_storeu_ps(tile + (i * kWindow + j) * channels, out[i][j]);
}

// V[t][p][c] for the tiles [first, first + count): B^T d B of each tile's 6x6 input window
// (zero outside the image: the conv's padding). Inside: the window lies in the image;
// otherwise positions outside read a clamped (valid) address and are masked to zero, which
// keeps the loads branch-free.
template <bool Inside>
inline void transform_input_tile(const float* x, int64_t C, const Tiles& tl, int64_t n, int64_t top,
                                 int64_t left, float* tile) {
  int64_t rows[kWindow], cols[kWindow];
  int row_in[kWindow], col_in[kWindow];
  for (int i = 0; i < kWindow; ++i) {
    const int64_t h = top - 1 + i, w = left - 1 + i;
    row_in[i] = h >= 0 && h < tl.h, col_in[i] = w >= 0 && w < tl.w;
    rows[i] = std::clamp<int64_t>(h, 0, tl.h - 1), cols[i] = std::clamp<int64_t>(w, 0, tl.w - 1);
  }
  for (int64_t c = 0; c < C; c += 8) {
    __m256 d[kWindow][kWindow];
#pragma GCC unroll 6
    for (int i = 0; i < kWindow; ++i) {
#pragma GCC unroll 6
      for (int j = 0; j < kWindow; ++j) {
        d[i][j] = _mm256_loadu_ps(x + ((n * tl.h + rows[i]) * tl.w + cols[j]) * C + c);
        if constexpr (!Inside) {
          const __m256 keep = _mm256_castsi256_ps(_mm256_set1_epi32(-(row_in[i] & col_in[j])));
          d[i][j] = _mm256_and_ps(d[i][j], keep);
        }
      }
    }
    __m256 out[kWindow][kWindow];
    transform_2d<kWindow, kWindow, input_1d>(d, out);
    store_points(out, tile + c, C);
  }
}

void transform_inputs(const float* x, int64_t C, const Tiles& tl, int64_t first, int64_t count,
                      float* v) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    float* tile = v + t * kPoints * C;
    if (top >= 1 && top + kWindow - 1 <= tl.h && left >= 1 && left + kWindow - 1 <= tl.w) {
      transform_input_tile<true>(x, C, tl, n, top, left, tile);
    } else {
      transform_input_tile<false>(x, C, tl, n, top, left, tile);
    }
  }
}

// E[t][p][k] = A g A^T of each tile's 4x4 block of output gradients (zero outside).
void transform_grads(const float* g, int64_t K, const Tiles& tl, int64_t first, int64_t count,
                     float* e) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    for (int64_t k = 0; k < K; k += 8) {
      __m256 d[kTile][kTile];
      for (int i = 0; i < kTile; ++i) {
        for (int j = 0; j < kTile; ++j) {
          const int64_t h = top + i, w = left + j;
          d[i][j] = h < tl.h && w < tl.w ? _mm256_loadu_ps(g + ((n * tl.h + h) * tl.w + w) * K + k)
                                         : _mm256_setzero_ps();
        }
      }
      __m256 out[kWindow][kWindow];
      transform_2d<kTile, kWindow, grad_1d>(d, out);
      store_points(out, e + t * kPoints * K + k, K);
    }
  }
}

// y = A^T m A (+ bias) for each tile's 36 products, written where the tile is in the image.
void transform_outputs(const float* m, int64_t K, const float* bias, const Tiles& tl,
                       int64_t first, int64_t count, float* y) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    for (int64_t k = 0; k < K; k += 8) {
      __m256 in[kWindow][kWindow];
      const float* tile = m + t * kPoints * K + k;
#pragma GCC unroll 6
      for (int i = 0; i < kWindow; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < kWindow; ++j) in[i][j] = _mm256_loadu_ps(tile + (i * kWindow + j) * K);
      __m256 out[kTile][kTile];
      transform_2d<kWindow, kTile, output_1d>(in, out);
      const __m256 b = bias ? _mm256_loadu_ps(bias + k) : _mm256_setzero_ps();
      for (int i = 0; i < kTile && top + i < tl.h; ++i)
        for (int j = 0; j < kTile && left + j < tl.w; ++j)
          _mm256_storeu_ps(y + ((n * tl.h + top + i) * tl.w + left + j) * K + k,
                           _mm256_add_ps(out[i][j], b));
    }
  }
}

// c[r][0..8*NV) (+)= sum_p a[r * a_row + p * a_depth] * b[p * ldb + 0..8*NV) for r < R:
// an R x 8NV register tile (R <= 6, NV <= 2: at most 12 accumulators).
template <int R, int NV, bool Accumulate>
inline void micro_kernel(const float* a, int64_t a_row, int64_t a_depth, const float* b,
                         int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? _mm256_loadu_ps(c + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t p = 0; p < depth; ++p) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + p * ldb + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_row + p * a_depth);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

template <int NV, bool Accumulate>
inline void micro_rows(int rows, const float* a, int64_t a_row, int64_t a_depth, const float* b,
                       int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  switch (rows) {
#define VGGBENCH_ROWS(R) \
  case R: return micro_kernel<R, NV, Accumulate>(a, a_row, a_depth, b, ldb, c, ldc, depth);
    VGGBENCH_ROWS(1) VGGBENCH_ROWS(2) VGGBENCH_ROWS(3) VGGBENCH_ROWS(4) VGGBENCH_ROWS(5)
    VGGBENCH_ROWS(6)
#undef VGGBENCH_ROWS
  }
}

// c (rows x cols) (+)= a (rows x depth, strides a_row / a_depth) @ b (depth x cols, row
// stride ldb); cols a multiple of 8.
template <bool Accumulate>
void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row,
          int64_t a_depth, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; r += 6) {
    const int n = static_cast<int>(std::min<int64_t>(6, rows - r));
    int64_t col = 0;
    for (; col + 16 <= cols; col += 16)
      micro_rows<2, Accumulate>(n, a + r * a_row, a_row, a_depth, b + col, ldb, c + r * ldc + col,
                                ldc, depth);
    if (col < cols)
      micro_rows<1, Accumulate>(n, a + r * a_row, a_row, a_depth, b + col, ldb, c + r * ldc + col,
                                ldc, depth);
  }
}

void conv_blocks(const float* x, const float* u, const float* bias, int64_t C, int64_t K,
                 const Tiles& tl, int64_t begin, int64_t end, float* y) {
  std::vector<float> v(kPoints * kBlockTiles * C), m(kPoints * kBlockTiles * K);
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kBlockTiles;
    const int64_t count = std::min(kBlockTiles, tl.count() - first);
    transform_inputs(x, C, tl, first, count, v.data());
    for (int p = 0; p < kPoints; ++p) {
      gemm<false>(count, K, C, v.data() + p * C, kPoints * C, 1, u + p * C * K, K,
                  m.data() + p * K, kPoints * K);
    }
    transform_outputs(m.data(), K, bias, tl, first, count, y);
  }
}

// Adds sum over the chunk's tiles of V[p]^T E[p] into partial[p] (C x K) for every p.
void weight_grad_chunk(const float* x, const float* g, int64_t C, int64_t K, const Tiles& tl,
                       int64_t chunk, float* partial) {
  std::vector<float> v(kPoints * kBlockTiles * C), e(kPoints * kBlockTiles * K);
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  const int64_t end = std::min(blocks, (chunk + 1) * kChunkBlocks);
  for (int64_t block = chunk * kChunkBlocks; block < end; ++block) {
    const int64_t first = block * kBlockTiles;
    const int64_t count = std::min(kBlockTiles, tl.count() - first);
    transform_inputs(x, C, tl, first, count, v.data());
    transform_grads(g, K, tl, first, count, e.data());
    for (int p = 0; p < kPoints; ++p) {
      gemm<true>(C, K, count, v.data() + p * C, 1, kPoints * C, e.data() + p * K, kPoints * K,
                 partial + p * C * K, K);
    }
  }
}

#pragma GCC pop_options
#endif  // VGGBENCH_WINOGRAD

bool cpu_has_avx2_fma() {
#if VGGBENCH_WINOGRAD
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding) {
  return cpu_has_avx2_fma() && x.device().is_cpu() && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 &&
         weight.size(2) == 3 && weight.size(3) == 3 && stride == 1 && padding == 1 &&
         x.size(1) % 8 == 0 && weight.size(0) % 8 == 0 &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.numel() > 0;
}

#if VGGBENCH_WINOGRAD
at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed_weight) {
  const int64_t C = x.size(1), K = transposed_weight ? weight.size(1) : weight.size(0);
  TORCH_INTERNAL_ASSERT(C == (transposed_weight ? weight.size(0) : weight.size(1)));
  const Tiles tl = tiles_of(x);
  at::Tensor y = at::empty({tl.n, K, tl.h, tl.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const std::vector<float> u = transform_weight(weight, transposed_weight);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* bias_data = bias ? b.const_data_ptr<float>() : nullptr;
  const float* in = x.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    conv_blocks(in, u.data(), bias_data, C, K, tl, begin, end, out);
  });
  return y;
}

at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad) {
  const int64_t C = x.size(1), K = grad.size(1);
  const Tiles tl = tiles_of(grad);
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  // one float partial per chunk, summed in chunk order in double: the same result for
  // any number of threads
  std::vector<float> partial(chunks * kPoints * C * K, 0.f);
  const float* in = x.const_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk)
      weight_grad_chunk(in, g, C, K, tl, chunk, partial.data() + chunk * kPoints * C * K);
  });
  at::Tensor w = at::empty({K, C, 3, 3}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* out = w.mutable_data_ptr<float>();
  const int64_t size = kPoints * C * K;
  std::vector<double> total(size, 0.0);  // the chunks' sums, each entry in chunk order
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* p = partial.data() + chunk * size;
      for (int64_t i = begin; i < end; ++i) total[i] += p[i];
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        double m[kWindow][kWindow];
        for (int p = 0; p < kPoints; ++p) m[p / kWindow][p % kWindow] = total[(p * C + c) * K + k];
        double half[kWindow][3];  // dW = G^T M G, one side at a time
        for (int a = 0; a < kWindow; ++a)
          for (int j = 0; j < 3; ++j) {
            half[a][j] = 0;
            for (int b = 0; b < kWindow; ++b) half[a][j] += m[a][b] * kG[b][j];
          }
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            double v = 0;
            for (int a = 0; a < kWindow; ++a) v += kG[a][i] * half[a][j];
            out[((k * C + c) * 3 + i) * 3 + j] = static_cast<float>(v);
          }
      }
    }
  });
  return w;
}
#else
at::Tensor winograd_conv(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         bool) {
  TORCH_CHECK(false, "vggbench: the Winograd conv needs an x86-64 AVX2 build");
}
at::Tensor winograd_weight_grad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "vggbench: the Winograd conv needs an x86-64 AVX2 build");
}
#endif

}  // namespace vggbench::cpu
