// Internal to the Winograd convs (winograd.cpp): the tiling shared by every instruction
// set, and the per-instruction-set kernels, compiled once per set from winograd_simd.h by
// winograd_avx2.cpp and winograd_avx512.cpp. Raw pointers only: the kernels run on
// buffers the caller owns, so nothing instruction-set specific crosses into std or ATen.
#pragma once

#include <cstdint>

namespace vggbench::cpu::winograd {

constexpr int kTile = 4, kWindow = 6, kPoints = kWindow * kWindow;
constexpr int64_t kBlockTiles = 18;  // tiles per block: transforms + products ~300 KB for C=K=32
// The weight gradient's blocks: twice as many tiles, which halves the loads and stores of its
// per-point partial sums per tile (C=K=32, 32x32, one thread: ~5-9% faster with AVX2 and
// AVX-512; the forward conv is 3-9% slower with blocks of 27 or 36).
constexpr int64_t kGradBlockTiles = 2 * kBlockTiles;

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

// What the conv does to each output y (bias added, as stored: bfloat16 rounded) before it is
// stored, as normalize_act does: leaky_relu(y * scale[k] + shift[k], slope), or with
// `affine` false leaky_relu(y, slope).
struct Activation {
  const float *scale, *shift;
  float slope;
  bool affine;
};

// The kernels of one instruction set, for activations of type T: float, or bfloat16 as its
// bits (uint16_t; float arithmetic, outputs rounded to nearest even).
template <typename T>
struct Typed {
  // y for the tiles of blocks [begin, end): U holds the transformed weights
  // [point][in][out]; v, m: scratch of kPoints * kBlockTiles * C (resp. K) floats. With
  // `shift` (K floats), block b also writes its outputs' per-channel sums of y - shift and
  // of its square to sums[b][0][k] and sums[b][1][k] (sums: blocks x 2 x K). With `act`
  // (and no shift), the activation of y is stored instead of y.
  void (*conv_blocks)(const T* x, const float* u, const float* bias, int64_t C, int64_t K,
                      const Tiles& tl, int64_t begin, int64_t end, T* y, float* v, float* m,
                      const float* shift, double* sums, const Activation* act);
  // partial[p] (C x K) = sum of V[p]^T E[p] over the tiles of blocks [begin, end) (begin <
  // end), blocks of kGradBlockTiles tiles; v, e: scratch of kPoints * kGradBlockTiles * C
  // (resp. K) floats.
  void (*weight_grad_blocks)(const T* x, const T* g, int64_t C, int64_t K, const Tiles& tl,
                             int64_t begin, int64_t end, float* partial, float* v, float* e);
};

// Channel counts are multiples of `width` (floats per vector register).
struct Kernels {
  int width;
  Typed<float> f32;
  Typed<uint16_t> bf16;
};

extern const Kernels kAvx2Kernels;    // AVX2 + FMA, 8 floats
extern const Kernels kAvx512Kernels;  // AVX-512 F/BW/VL, 16 floats

}  // namespace vggbench::cpu::winograd
