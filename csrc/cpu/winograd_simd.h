// The Winograd F(4x4, 3x3) kernels (see winograd.cpp), written once for a vector type:
// included by winograd_avx2.cpp and winograd_avx512.cpp inside their own namespace and
// `#pragma GCC target`, after defining `struct V` (the register type `V::type`, its width
// `V::kWidth` in floats, `V::kRows` rows of the matrix products' register tile, and the
// operations used below). Each lane does the same operations in the same order whatever
// the width, so every instruction set gives the same bits. No includes and no std calls
// here: everything in this file is compiled for the including file's instruction set only.
// (No include guard: included once per instruction set.)

using vec = V::type;
constexpr int kWidth = V::kWidth;

inline vec fma(float a, vec x, vec y) { return V::fmadd(V::set1(a), x, y); }
inline vec add(vec x, vec y) { return V::add(x, y); }
inline vec sub(vec x, vec y) { return V::sub(x, y); }
inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

// The 1-D transforms, kWidth channels at a time; d[i * s] is entry i.
// B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0; 0 -2 -1 2 1 0;
//        0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]
inline void input_1d(const vec* d, int s, vec* r, int rs) {
  const vec d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
  const vec a = sub(d3, d1), b = sub(d4, d2);
  r[0] = fma(1.5f, a, fma(-2.f, d2, add(d0, d4)));
  r[rs] = fma(2.5f, d3, fma(0.5f, d2, sub(d4, d1)));
  r[2 * rs] = fma(0.5f, d3, fma(-2.5f, d2, add(d1, d4)));
  r[3 * rs] = fma(2.f, a, b);
  r[4 * rs] = fma(-0.5f, a, b);
  r[5 * rs] = fma(1.5f, b, fma(-2.f, d3, add(d1, d5)));
}

// A^T = [1 1 1 1 1 0; 0 1 -1 1/2 -2 0; 0 1 1 1/4 4 0; 0 1 -1 1/8 -8 1]
inline void output_1d(const vec* m, int s, vec* o, int os) {
  const vec m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
  const vec sum = add(m1, m2), diff = sub(m1, m2);
  o[0] = add(add(m0, sum), add(m3, m4));
  o[os] = fma(0.5f, m3, fma(-2.f, m4, diff));
  o[2 * os] = fma(0.25f, m3, fma(4.f, m4, sum));
  o[3 * os] = fma(0.125f, m3, fma(-8.f, m4, add(diff, m5)));
}

// A = (A^T)^T: the weight gradient's transform of 4-entry output-gradient rows.
inline void grad_1d(const vec* e, int s, vec* r, int rs) {
  const vec e0 = e[0], e1 = e[s], e2 = e[2 * s], e3 = e[3 * s];
  const vec even = add(e0, e2), odd = add(e1, e3);
  r[0] = e0;
  r[rs] = add(even, odd);
  r[2 * rs] = sub(even, odd);
  r[3 * rs] = fma(0.5f, e1, fma(0.25f, e2, fma(0.125f, e3, e0)));
  r[4 * rs] = fma(-2.f, e1, fma(4.f, e2, fma(-8.f, e3, e0)));
  r[5 * rs] = e3;
}

// out = M in M^T for a 1-D transform M from In to Out entries.
template <int In, int Out, void (*Transform)(const vec*, int, vec*, int)>
inline void transform_2d(const vec (&in)[In][In], vec (&out)[Out][Out]) {
  vec rows[Out][In];
  for (int j = 0; j < In; ++j) Transform(&in[0][j], In, &rows[0][j], In);
  for (int i = 0; i < Out; ++i) Transform(&rows[i][0], 1, &out[i][0], 1);
}

// Transformed blocks are laid out [tile][point][channel]: one tile's 36 points are
// contiguous (the transforms write and read them together), and the products of one point
// over the block's tiles are a matrix with row stride kPoints * channels.

// Stores a tile's 36 transformed entries for channels c..c+kWidth.
inline void store_points(const vec (&out)[kWindow][kWindow], float* tile, int64_t channels) {
#pragma GCC unroll 6
  for (int i = 0; i < kWindow; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < kWindow; ++j) V::store(tile + (i * kWindow + j) * channels, out[i][j]);
}

// Activations are T: float, or bfloat16 as its bits (uint16_t), widened to float on load
// and rounded to nearest even on store (V::load, V::store); everything between is float.

// V[t][p][c] for one tile: B^T d B of its 6x6 input window (zero outside the image: the
// conv's padding). Inside: the window lies in the image; otherwise positions outside read
// a clamped (valid) address and are masked to zero, which keeps the loads branch-free.
template <bool Inside, typename T>
inline void transform_input_tile(const T* x, int64_t C, const Tiles& tl, int64_t n, int64_t top,
                                 int64_t left, float* tile) {
  int64_t rows[kWindow], cols[kWindow];
  bool row_in[kWindow], col_in[kWindow];
  for (int i = 0; i < kWindow; ++i) {
    const int64_t h = top - 1 + i, w = left - 1 + i;
    row_in[i] = h >= 0 && h < tl.h, col_in[i] = w >= 0 && w < tl.w;
    rows[i] = clamp(h, 0, tl.h - 1), cols[i] = clamp(w, 0, tl.w - 1);
  }
  for (int64_t c = 0; c < C; c += kWidth) {
    vec d[kWindow][kWindow];
#pragma GCC unroll 6
    for (int i = 0; i < kWindow; ++i) {
#pragma GCC unroll 6
      for (int j = 0; j < kWindow; ++j) {
        d[i][j] = V::load(x + ((n * tl.h + rows[i]) * tl.w + cols[j]) * C + c);
        if constexpr (!Inside) d[i][j] = V::keep_if(d[i][j], row_in[i] && col_in[j]);
      }
    }
    vec out[kWindow][kWindow];
    transform_2d<kWindow, kWindow, input_1d>(d, out);
    store_points(out, tile + c, C);
  }
}

// V for the tiles [first, first + count).
template <typename T>
inline void transform_inputs(const T* x, int64_t C, const Tiles& tl, int64_t first, int64_t count,
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
template <typename T>
inline void transform_grads(const T* g, int64_t K, const Tiles& tl, int64_t first, int64_t count,
                            float* e) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    for (int64_t k = 0; k < K; k += kWidth) {
      vec d[kTile][kTile];
      for (int i = 0; i < kTile; ++i) {
        for (int j = 0; j < kTile; ++j) {
          const int64_t h = top + i, w = left + j;
          d[i][j] = h < tl.h && w < tl.w ? V::load(g + ((n * tl.h + h) * tl.w + w) * K + k) : V::zero();
        }
      }
      vec out[kWindow][kWindow];
      transform_2d<kTile, kWindow, grad_1d>(d, out);
      store_points(out, e + t * kPoints * K + k, K);
    }
  }
}

// y = A^T m A (+ bias) for each tile's 36 products, written where the tile is in the image.
template <typename T>
inline void transform_outputs(const float* m, int64_t K, const float* bias, const Tiles& tl,
                              int64_t first, int64_t count, T* y) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    for (int64_t k = 0; k < K; k += kWidth) {
      vec in[kWindow][kWindow];
      const float* tile = m + t * kPoints * K + k;
#pragma GCC unroll 6
      for (int i = 0; i < kWindow; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < kWindow; ++j) in[i][j] = V::load(tile + (i * kWindow + j) * K);
      vec out[kTile][kTile];
      transform_2d<kWindow, kTile, output_1d>(in, out);
      const vec b = bias ? V::load(bias + k) : V::zero();
      for (int i = 0; i < kTile && top + i < tl.h; ++i)
        for (int j = 0; j < kTile && left + j < tl.w; ++j)
          V::store(y + ((n * tl.h + top + i) * tl.w + left + j) * K + k, add(out[i][j], b));
    }
  }
}

// c[r][0..kWidth*NV) (+)= sum_p a[r * a_row + p * a_depth] * b[p * ldb + 0..kWidth*NV) for
// r < R: an R x NV register tile of accumulators, summed over p in order.
template <int R, int NV, bool Accumulate>
inline void micro_kernel(const float* a, int64_t a_row, int64_t a_depth, const float* b,
                         int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Accumulate ? V::load(c + r * ldc + kWidth * v) : V::zero();
  for (int64_t p = 0; p < depth; ++p) {
    vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + p * ldb + kWidth * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vec av = V::set1(a[r * a_row + p * a_depth]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(c + r * ldc + kWidth * v, acc[r][v]);
}

// micro_kernel for `rows` (1..R) rows.
template <int R, int NV, bool Accumulate>
inline void micro_rows(int rows, const float* a, int64_t a_row, int64_t a_depth, const float* b,
                       int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  if (rows == R) return micro_kernel<R, NV, Accumulate>(a, a_row, a_depth, b, ldb, c, ldc, depth);
  if constexpr (R > 1) micro_rows<R - 1, NV, Accumulate>(rows, a, a_row, a_depth, b, ldb, c, ldc, depth);
}

// c (rows x cols) (+)= a (rows x depth, strides a_row / a_depth) @ b (depth x cols, row
// stride ldb); cols a multiple of kWidth.
template <bool Accumulate>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row,
                 int64_t a_depth, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; r += V::kRows) {
    const int n = static_cast<int>(lesser(V::kRows, rows - r));
    int64_t col = 0;
    for (; col + 2 * kWidth <= cols; col += 2 * kWidth)
      micro_rows<V::kRows, 2, Accumulate>(n, a + r * a_row, a_row, a_depth, b + col, ldb,
                                          c + r * ldc + col, ldc, depth);
    if (col < cols)
      micro_rows<V::kRows, 1, Accumulate>(n, a + r * a_row, a_row, a_depth, b + col, ldb,
                                          c + r * ldc + col, ldc, depth);
  }
}

template <typename T>
void conv_blocks(const T* x, const float* u, const float* bias, int64_t C, int64_t K,
                 const Tiles& tl, int64_t begin, int64_t end, T* y, float* v, float* m) {
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kBlockTiles;
    const int64_t count = lesser(kBlockTiles, tl.count() - first);
    transform_inputs(x, C, tl, first, count, v);
    for (int p = 0; p < kPoints; ++p)
      gemm<false>(count, K, C, v + p * C, kPoints * C, 1, u + p * C * K, K, m + p * K, kPoints * K);
    transform_outputs(m, K, bias, tl, first, count, y);
  }
}

template <typename T>
void weight_grad_blocks(const T* x, const T* g, int64_t C, int64_t K, const Tiles& tl,
                        int64_t begin, int64_t end, float* partial, float* v, float* e) {
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kBlockTiles;
    const int64_t count = lesser(kBlockTiles, tl.count() - first);
    transform_inputs(x, C, tl, first, count, v);
    transform_grads(g, K, tl, first, count, e);
    for (int p = 0; p < kPoints; ++p) {
      float* out = partial + p * C * K;
      if (block == begin) {  // the first block sets the sums: no zeroing pass
        gemm<false>(C, K, count, v + p * C, 1, kPoints * C, e + p * K, kPoints * K, out, K);
      } else {
        gemm<true>(C, K, count, v + p * C, 1, kPoints * C, e + p * K, kPoints * K, out, K);
      }
    }
  }
}
