// The Winograd F(4x4, 3x3) kernels (see winograd.cpp), written once for a vector type:
// included by winograd_avx2.cpp and winograd_avx512.cpp inside their own namespace and
// `#pragma GCC target`, after defining `struct V` (the register type `V::type`, its width
// `V::kWidth` in floats, `V::kRows` rows (tiles) of the conv products' register tile and
// `V::kGradRows` rows (input channels, dividing kWidth) of the weight gradient's, and the
// operations used below). Each lane does the same operations in the same order whatever
// the width, so every instruction set gives the same bits. No includes and no std calls
// here: everything in this file is compiled for the including file's instruction set only.
// (No include guard: included once per instruction set.)

using vec = V::type;
// The transforms and the products' register tiles: inlined whatever the compiler's budget,
// or their register arrays go through memory.
#define VGGBENCH_INLINE inline __attribute__((always_inline))
constexpr int kWidth = V::kWidth;

inline vec fma(float a, vec x, vec y) { return V::fmadd(V::set1(a), x, y); }
inline vec add(vec x, vec y) { return V::add(x, y); }
inline vec sub(vec x, vec y) { return V::sub(x, y); }
inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

// The 1-D transforms, kWidth channels at a time; d[i * s] is entry i.
// B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0; 0 -2 -1 2 1 0;
//        0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]
VGGBENCH_INLINE void input_1d(const vec* d, int s, vec* r, int rs) {
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
VGGBENCH_INLINE void output_1d(const vec* m, int s, vec* o, int os) {
  const vec m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
  const vec sum = add(m1, m2), diff = sub(m1, m2);
  o[0] = add(add(m0, sum), add(m3, m4));
  o[os] = fma(0.5f, m3, fma(-2.f, m4, diff));
  o[2 * os] = fma(0.25f, m3, fma(4.f, m4, sum));
  o[3 * os] = fma(0.125f, m3, fma(-8.f, m4, add(diff, m5)));
}

// A = (A^T)^T: the weight gradient's transform of 4-entry output-gradient rows.
VGGBENCH_INLINE void grad_1d(const vec* e, int s, vec* r, int rs) {
  const vec e0 = e[0], e1 = e[s], e2 = e[2 * s], e3 = e[3 * s];
  const vec even = add(e0, e2), odd = add(e1, e3);
  r[0] = e0;
  r[rs] = add(even, odd);
  r[2 * rs] = sub(even, odd);
  r[3 * rs] = fma(0.5f, e1, fma(0.25f, e2, fma(0.125f, e3, e0)));
  r[4 * rs] = fma(-2.f, e1, fma(4.f, e2, fma(-8.f, e3, e0)));
  r[5 * rs] = e3;
}

// out = M in M^T for a 1-D transform M from In to Out entries, in(i, j) = load(i, j),
// out(i, j) passed to store(i, j, value): columns first, each as it is loaded, then rows,
// each stored as it is transformed, so that few registers are live at a time. In Parts
// parts of Out / Parts rows of out, each loading every column again (the unused entries of
// its column transforms are optimised away): the input transform's 6x6 intermediate
// otherwise goes through the stack (halves: forward conv ~2.5% faster, AVX2 and AVX-512).
template <int In, int Out, void (*Transform)(const vec*, int, vec*, int), int Parts = 1, typename Load,
          typename Store>
VGGBENCH_INLINE void transform_2d(Load load, Store store) {
  static_assert(Out % Parts == 0, "parts of equal rows");
  constexpr int kRowsPerPart = Out / Parts;
#pragma GCC unroll 6
  for (int part = 0; part < Parts; ++part) {
    vec half[kRowsPerPart][In];
#pragma GCC unroll 6
    for (int j = 0; j < In; ++j) {
      vec column[In], transformed[Out];
#pragma GCC unroll 6
      for (int i = 0; i < In; ++i) column[i] = load(i, j);
      Transform(column, 1, transformed, 1);
#pragma GCC unroll 6
      for (int i = 0; i < kRowsPerPart; ++i) half[i][j] = transformed[part * kRowsPerPart + i];
    }
#pragma GCC unroll 6
    for (int i = 0; i < kRowsPerPart; ++i) {
      vec row[Out];
      Transform(half[i], 1, row, 1);
#pragma GCC unroll 6
      for (int j = 0; j < Out; ++j) store(part * kRowsPerPart + i, j, row[j]);
    }
  }
}

// A block's transformed tiles are laid out [channel group][point][tile slot][lane], a group
// being kWidth channels and a block having Slots slots (kBlockTiles, or the weight
// gradient's kGradBlockTiles): a point's tiles are contiguous, so the products' operand rows
// share cache lines (the layout with the 36 points of a tile contiguous: conv ~3-4% and weight
// gradient up to ~10% slower, AVX2, one thread), and every stride but the number of groups is
// known to the compiler, so the transforms and the register tiles need no address arithmetic.
constexpr int64_t kTileStride = kWidth;
template <int64_t Slots>
constexpr int64_t kPointStride = Slots * kWidth;
template <int64_t Slots>
constexpr int64_t kGroupStride = kPoints * kPointStride<Slots>;

// Where tile slot t's group of channels c..c+kWidth starts (c a multiple of kWidth).
template <int64_t Slots>
inline int64_t slot(int64_t t, int64_t c) { return c / kWidth * kGroupStride<Slots> + t * kTileStride; }

// Activations are T: float, or bfloat16 as its bits (uint16_t), widened to float on load
// and rounded to nearest even on store (V::load, V::store); everything between is float.

// V for tile slot t: B^T d B of its 6x6 input window (zero outside the image: the conv's
// padding). Inside: the window lies in the image; otherwise positions outside read a
// clamped (valid) address and are masked to zero, which keeps the loads branch-free.
template <bool Inside, int64_t Slots, typename T>
VGGBENCH_INLINE void transform_input_tile(const T* x, int64_t C, const Tiles& tl, int64_t n, int64_t top,
                                          int64_t left, float* v, int64_t t) {
  const T* row[kWindow];  // the window's rows, clamped into the image
  int64_t col[kWindow];   // offsets of its columns, clamped
  bool row_in[kWindow], col_in[kWindow];
  for (int i = 0; i < kWindow; ++i) {
    const int64_t h = top - 1 + i, w = left - 1 + i;
    row_in[i] = h >= 0 && h < tl.h, col_in[i] = w >= 0 && w < tl.w;
    row[i] = x + (n * tl.h + clamp(h, 0, tl.h - 1)) * tl.w * C, col[i] = clamp(w, 0, tl.w - 1) * C;
  }
  for (int64_t c = 0; c < C; c += kWidth) {
    float* group = v + slot<Slots>(t, c);
    transform_2d<kWindow, kWindow, input_1d, 2>(
        [&](int i, int j) {
          const vec d = V::load(row[i] + col[j] + c);
          return Inside ? d : V::keep_if(d, row_in[i] && col_in[j]);
        },
        [&](int i, int j, vec value) { V::store(group + (i * kWindow + j) * kPointStride<Slots>, value); });
  }
}

// V for the tiles [first, first + count), in a block of Slots slots.
template <int64_t Slots, typename T>
inline void transform_inputs(const T* x, int64_t C, const Tiles& tl, int64_t first, int64_t count,
                             float* v) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    if (top >= 1 && top + kWindow - 1 <= tl.h && left >= 1 && left + kWindow - 1 <= tl.w) {
      transform_input_tile<true, Slots>(x, C, tl, n, top, left, v, t);
    } else {
      transform_input_tile<false, Slots>(x, C, tl, n, top, left, v, t);
    }
  }
}

// E = A g A^T of each tile's 4x4 block of output gradients (zero outside), in a block of
// kGradBlockTiles slots.
template <typename T>
inline void transform_grads(const T* g, int64_t K, const Tiles& tl, int64_t first, int64_t count,
                            float* e) {
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    for (int64_t k = 0; k < K; k += kWidth) {
      float* group = e + slot<kGradBlockTiles>(t, k);
      transform_2d<kTile, kWindow, grad_1d>(
          [&](int i, int j) {
            const int64_t h = top + i, w = left + j;
            return h < tl.h && w < tl.w ? V::load(g + ((n * tl.h + h) * tl.w + w) * K + k) : V::zero();
          },
          [&](int i, int j, vec value) {
            V::store(group + (i * kWindow + j) * kPointStride<kGradBlockTiles>, value);
          });
    }
  }
}

// The value stored at p: a float as it is; bfloat16 rounded, so read back.
inline vec stored(const float*, vec value) { return value; }
inline vec stored(const uint16_t* p, vec) { return V::load(p); }

// value as stored at p (bfloat16: rounded, by storing it there and reading it back).
inline vec as_stored(float*, vec value) { return value; }
inline vec as_stored(uint16_t* p, vec value) {
  V::store(p, value);
  return V::load(p);
}

// y = A^T m A (+ bias) for each tile's 36 products, written where the tile is in the image.
// Stats: also each channel's sums of d = y - shift and of d^2 over the values written (as
// stored), in float per tile, added in tile order in double to sums[k] and sums[K + k].
// Act: the activation of y (as stored) is written instead (Activation, from `act`).
template <bool Stats, bool Act, typename T>
inline void transform_outputs(const float* m, int64_t K, const float* bias, const Tiles& tl,
                              int64_t first, int64_t count, T* y, const float* shift, double* sums,
                              const Activation* act) {
  static_assert(!(Stats && Act), "statistics of y, or its activation");
  const vec slope = Act ? V::set1(act->slope) : V::zero();
  for (int64_t t = 0; t < count; ++t) {
    int64_t n, top, left;
    tl.locate(first + t, n, top, left);
    const int64_t rows = lesser(kTile, tl.h - top), cols = lesser(kTile, tl.w - left);
    T* corner = y + ((n * tl.h + top) * tl.w + left) * K;
    const bool whole = rows == kTile && cols == kTile;
    for (int64_t k = 0; k < K; k += kWidth) {
      const float* group = m + slot<kBlockTiles>(t, k);
      const vec b = bias ? V::load(bias + k) : V::zero();
      const vec s = Stats ? V::load(shift + k) : V::zero();
      const bool affine = Act && act->affine;
      const vec scale = affine ? V::load(act->scale + k) : V::zero();
      const vec offset = affine ? V::load(act->shift + k) : V::zero();
      vec sum = V::zero(), sum_sq = V::zero();
      transform_2d<kWindow, kTile, output_1d>(
          [&](int i, int j) { return V::load(group + (i * kWindow + j) * kPointStride<kBlockTiles>); },
          [&](int i, int j, vec value) {
            if (whole || (i < rows && j < cols)) {
              T* out = corner + (i * tl.w + j) * K + k;
              if constexpr (Act) {
                const vec z = as_stored(out, add(value, b));
                V::store(out, V::leaky_relu(affine ? add(V::mul(z, scale), offset) : z, slope));
                return;
              }
              V::store(out, add(value, b));
              if constexpr (Stats) {
                const vec d = sub(stored(out, add(value, b)), s);
                sum = add(sum, d), sum_sq = V::fmadd(d, d, sum_sq);
              }
            }
          });
      if constexpr (Stats) V::add_to(sums + k, sum), V::add_to(sums + K + k, sum_sq);
    }
  }
}

// How a product's operand steps along the sum's index d: entry d is at
// (d / kWidth) * group + (d % kWidth) * lane.
struct Steps {
  int64_t lane, group;
};

// c[r][v] (+)= sum_d a[r * a_row + steps_a(d)] * b[steps_b(d) + v * b_vec] (vectors of
// kWidth) for r < R, v < NV, stored at c + r * c_row + v * c_vec: an R x NV register tile
// of accumulators, summed over d in order.
template <int R, int NV, bool Accumulate>
VGGBENCH_INLINE void micro_kernel(const float* a, int64_t a_row, Steps sa, const float* b, int64_t b_vec,
                                  Steps sb, float* c, int64_t c_row, int64_t c_vec, int64_t depth) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Accumulate ? V::load(c + r * c_row + v * c_vec) : V::zero();
  for (int64_t d0 = 0; d0 < depth; d0 += kWidth, a += sa.group, b += sb.group) {
    const int64_t lanes = lesser(kWidth, depth - d0);
    for (int64_t d = 0; d < lanes; ++d) {
      vec bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + d * sb.lane + v * b_vec);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const vec av = V::set1(a[r * a_row + d * sa.lane]);
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(c + r * c_row + v * c_vec, acc[r][v]);
}

// micro_kernel for `rows` (1..R) rows.
template <int R, int NV, bool Accumulate>
VGGBENCH_INLINE void micro_rows(int rows, const float* a, int64_t a_row, Steps sa, const float* b, int64_t b_vec,
                                Steps sb, float* c, int64_t c_row, int64_t c_vec, int64_t depth) {
  if (rows == R) return micro_kernel<R, NV, Accumulate>(a, a_row, sa, b, b_vec, sb, c, c_row, c_vec, depth);
  if constexpr (R > 1) micro_rows<R - 1, NV, Accumulate>(rows, a, a_row, sa, b, b_vec, sb, c, c_row, c_vec, depth);
}

// c (rows x cols) (+)= a (rows x depth) @ b (depth x cols), cols a multiple of kWidth, in
// register tiles of R rows (c's vector v of row r at c + r * c_row + v * c_vec); row r of a
// starts at a_rows(r), and is read in tiles of R rows at a_row apart.
template <int R, bool Accumulate, typename RowsOf>
VGGBENCH_INLINE void gemm(int64_t rows, int64_t cols, int64_t depth, RowsOf a_rows, int64_t a_row, Steps sa,
                          const float* b, int64_t b_vec, Steps sb, float* c, int64_t c_row, int64_t c_vec) {
  for (int64_t r = 0; r < rows; r += R) {
    const int n = static_cast<int>(lesser(R, rows - r));
    int64_t v = 0;
    for (; v + 2 <= cols / kWidth; v += 2)
      micro_rows<R, 2, Accumulate>(n, a_rows(r), a_row, sa, b + v * b_vec, b_vec, sb, c + r * c_row + v * c_vec,
                                   c_row, c_vec, depth);
    if (v < cols / kWidth)
      micro_rows<R, 1, Accumulate>(n, a_rows(r), a_row, sa, b + v * b_vec, b_vec, sb, c + r * c_row + v * c_vec,
                                   c_row, c_vec, depth);
  }
}

// Software prefetch of the image rows that a block's transforms will read or write, issued
// in kParts parts between the products, which hide its latency (forward conv at 32x32, one
// thread: 5-9% faster, AVX2 and AVX-512 alike; the output rows' share is most of it: the
// stores no longer wait for their lines. Weight gradient, N=100, 32x32, C=K=32, 2 threads,
// Zen 4: 16% faster with AVX-512, 7% with AVX2). The hardware's prefetchers do little here: they
// stay within 4 KB pages, one row of a 32x32 map of 32 floats.
class Prefetch {
 public:
  // Plan the lines of the rows of `a` (`channels` per pixel) that tiles [first, first +
  // count) cover, from `above` rows above the first tile's top to `below` rows below the
  // last tile's, clamped to the image, less those planned before (tiles come in order).
  template <typename T>
  void plan(const T* a, int64_t channels, const Tiles& tl, int64_t first, int64_t count, int above, int below) {
    int64_t n0, top0, n1, top1, left;
    tl.locate(first, n0, top0, left);
    tl.locate(first + count - 1, n1, top1, left);
    const int64_t row_bytes = tl.w * channels * static_cast<int64_t>(sizeof(T));
    const char* base = reinterpret_cast<const char*>(a);
    const char* begin = base + (n0 * tl.h + clamp(top0 - above, 0, tl.h - 1)) * row_bytes;
    const char* end = base + (n1 * tl.h + clamp(top1 + below, 0, tl.h - 1) + 1) * row_bytes;
    next_ = begin > reached_ ? begin : reached_;
    end_ = end;
    if (end > reached_) reached_ = end;
    per_part_ = next_ < end_ ? ((end_ - next_) / kLine + kParts) / kParts : 0;
  }
  // The next of kParts parts of the planned lines, for reading (Write: for writing).
  template <bool Write>
  VGGBENCH_INLINE void part() {
    for (int64_t i = 0; i < per_part_ && next_ < end_; ++i, next_ += kLine) __builtin_prefetch(next_, Write, 2);
  }
  static constexpr int kParts = kPoints;

 private:
  static constexpr int64_t kLine = 64;
  const char *next_ = nullptr, *end_ = nullptr, *reached_ = nullptr;
  int64_t per_part_ = 0;
};

template <typename T>
void conv_blocks(const T* x, const float* u, const float* bias, int64_t C, int64_t K,
                 const Tiles& tl, int64_t begin, int64_t end, T* y, float* v, float* m,
                 const float* shift, double* sums, const Activation* act) {
  Prefetch inputs, outputs;  // the next block's input windows, this block's outputs
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kBlockTiles;
    const int64_t count = lesser(kBlockTiles, tl.count() - first);
    transform_inputs<kBlockTiles>(x, C, tl, first, count, v);
    const int64_t next = first + kBlockTiles;
    if (block + 1 < end) inputs.plan(x, C, tl, next, lesser(kBlockTiles, tl.count() - next), 1, kWindow - 2);
    outputs.plan(y, K, tl, first, count, 0, kTile - 1);
    // per point p: M_p (tiles x K) = V_p (tiles x C) @ U_p (C x K), U_p rows of K floats
    for (int p = 0; p < kPoints; ++p) {
      inputs.part<false>(), outputs.part<true>();
      const float* vp = v + p * kPointStride<kBlockTiles>;
      const auto tiles = [&](int64_t t) { return vp + t * kTileStride; };
      gemm<V::kRows, false>(count, K, C, tiles, kTileStride, {1, kGroupStride<kBlockTiles>}, u + p * C * K,
                            kWidth, {K, kWidth * K}, m + p * kPointStride<kBlockTiles>, kTileStride,
                            kGroupStride<kBlockTiles>);
    }
    if (shift) {
      double* block_sums = sums + block * 2 * K;
      for (int64_t i = 0; i < 2 * K; ++i) block_sums[i] = 0;
      transform_outputs<true, false>(m, K, bias, tl, first, count, y, shift, block_sums, nullptr);
    } else if (act) {
      transform_outputs<false, true>(m, K, bias, tl, first, count, y, nullptr, nullptr, act);
    } else {
      transform_outputs<false, false>(m, K, bias, tl, first, count, y, nullptr, nullptr, nullptr);
    }
  }
}

template <typename T>
void weight_grad_blocks(const T* x, const T* g, int64_t C, int64_t K, const Tiles& tl,
                        int64_t begin, int64_t end, float* partial, float* v, float* e) {
  static_assert(kWidth % V::kGradRows == 0, "a register tile's channels lie in one group");
  Prefetch inputs, grads;  // the next block's input windows and output-gradient tiles
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kGradBlockTiles;
    const int64_t count = lesser(kGradBlockTiles, tl.count() - first);
    transform_inputs<kGradBlockTiles>(x, C, tl, first, count, v);
    transform_grads(g, K, tl, first, count, e);
    const int64_t next = first + kGradBlockTiles;
    if (block + 1 < end) {
      const int64_t next_count = lesser(kGradBlockTiles, tl.count() - next);
      inputs.plan(x, C, tl, next, next_count, 1, kWindow - 2);
      grads.plan(g, K, tl, next, next_count, 0, kTile - 1);
    }
    // per point p: partial_p (C x K) (+)= V_p^T (C x tiles) @ E_p (tiles x K)
    constexpr int64_t kGroup = kGroupStride<kGradBlockTiles>;
    for (int p = 0; p < kPoints; ++p) {
      inputs.part<false>(), grads.part<false>();
      const float *vp = v + p * kPointStride<kGradBlockTiles>, *ep = e + p * kPointStride<kGradBlockTiles>;
      const auto channels = [&](int64_t c) { return vp + slot<kGradBlockTiles>(0, c) + c % kWidth; };
      const Steps tiles{kTileStride, kWidth * kTileStride};
      float* out = partial + p * C * K;
      if (block == begin) {  // the first block sets the sums: no zeroing pass
        gemm<V::kGradRows, false>(C, K, count, channels, 1, tiles, ep, kGroup, tiles, out, K, kWidth);
      } else {
        gemm<V::kGradRows, true>(C, K, count, channels, 1, tiles, ep, kGroup, tiles, out, K, kWidth);
      }
    }
  }
}
