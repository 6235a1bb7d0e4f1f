// Winograd F(4x4, 3x3) for the CPU (see winograd.h). Each 4x4 block of outputs (a tile)
// comes from a 6x6 block of inputs; in the transformed domain the conv becomes 36
// independent (tiles x C) @ (C x K) matrix products, 4x fewer multiplications than the
// direct conv. Tiles are processed in blocks small enough that their transformed inputs,
// products and the transformed weights stay in L2; channels are innermost (NHWC), so every
// transform is one vector register of channels wide. This file holds what is common to the
// instruction sets (the weight transforms, threading, the choice of kernels); the kernels
// themselves are in winograd_simd.h, compiled per instruction set.
//
// Interpolation points 0, 1, -1, 1/2, -2 (and infinity) rather than the usual +-1, +-2:
// their float32 error is within ~1.3x of the direct conv's (the usual points: ~5x).
#include "winograd.h"

#include "winograd_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define VGGBENCH_WINOGRAD 1
#else
#define VGGBENCH_WINOGRAD 0
#endif

namespace vggbench::cpu {
namespace {

using winograd::kBlockTiles, winograd::kChunkBlocks, winograd::kPoints, winograd::kTile,
    winograd::kWindow, winograd::Kernels, winograd::Tiles;

constexpr double kThird = 1.0 / 3, kFifteenth = 1.0 / 15;
// The weight transform G (6x3); the input transform B^T (6x6) and the output transform
// A^T (4x6) are spelled out in winograd_simd.h.
constexpr double kG[6][3] = {{1, 0, 0},
                             {kThird, kThird, kThird},
                             {-kThird, kThird, -kThird},
                             {-16 * kFifteenth, -8 * kFifteenth, -4 * kFifteenth},
                             {kFifteenth, -2 * kFifteenth, 4 * kFifteenth},
                             {0, 0, 1}};

Tiles tiles_of(const at::Tensor& t) {
  const int64_t h = t.size(2), w = t.size(3);
  return {t.size(0), h, w, (h + kTile - 1) / kTile, (w + kTile - 1) / kTile};
}

// U[a*6+b][c][k] = (G w G^T)[a][b] for each 3x3 filter w from channel c to k (double, one
// side at a time). Serial: ~30 us for 32x32 filters, less
// than starting the threads costs on a busy machine.
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
      double half[kWindow][3];  // G g
      for (int a = 0; a < kWindow; ++a)
        for (int j = 0; j < 3; ++j) half[a][j] = kG[a][0] * g[0][j] + kG[a][1] * g[1][j] + kG[a][2] * g[2][j];
      const int64_t row = transposed ? k : c, col = transposed ? c : k;
      for (int a = 0; a < kWindow; ++a) {
        for (int b = 0; b < kWindow; ++b) {
          const double s = half[a][0] * kG[b][0] + half[a][1] * kG[b][1] + half[a][2] * kG[b][2];
          u[((a * kWindow + b) * in_ch + row) * out_ch + col] = static_cast<float>(s);
        }
      }
    }
  }
  return u;
}

bool cpu_has_avx2_fma() {
#if VGGBENCH_WINOGRAD
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if VGGBENCH_WINOGRAD
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

Isa detect_isa() {
  const Isa widest = cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2_fma() ? Isa::kAvx2 : Isa::kNone;
  const char* asked = std::getenv("VGGBENCH_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return widest;
  const std::string name(asked);
  TORCH_CHECK(name == "avx2" || name == "avx512",
              "VGGBENCH_CPU_ISA must be avx2 or avx512 (or unset: the widest this CPU has), got '", name, "'");
  const Isa isa = name == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(widest), "VGGBENCH_CPU_ISA=", name,
              ": this CPU lacks it (it has: ", isa_name(widest), "); unset VGGBENCH_CPU_ISA or choose avx2");
  return isa;
}

// The kernels for `isa`, narrowed until channel counts C and K fill whole registers.
const Kernels& kernels_for(Isa isa, int64_t C, int64_t K) {
  TORCH_CHECK(isa != Isa::kNone && static_cast<int>(isa) <= static_cast<int>(winograd_isa()),
              "vggbench: the Winograd conv needs ", isa_name(isa == Isa::kNone ? Isa::kAvx2 : isa),
              " (this CPU or VGGBENCH_CPU_ISA allows: ", isa_name(winograd_isa()), ")");
#if VGGBENCH_WINOGRAD
  if (isa == Isa::kAvx512 && C % winograd::kAvx512Kernels.width == 0 &&
      K % winograd::kAvx512Kernels.width == 0) {
    return winograd::kAvx512Kernels;
  }
  return winograd::kAvx2Kernels;
#else
  TORCH_CHECK(false, "vggbench: the Winograd conv needs an x86-64 build");
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNone: break;
  }
  return "none";
}

Isa winograd_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding) {
  return winograd_isa() != Isa::kNone && x.device().is_cpu() && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 &&
         weight.size(2) == 3 && weight.size(3) == 3 && stride == 1 && padding == 1 &&
         x.size(1) % 8 == 0 && weight.size(0) % 8 == 0 && x.numel() > 0 &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed_weight, Isa isa) {
  const int64_t C = x.size(1), K = transposed_weight ? weight.size(1) : weight.size(0);
  TORCH_INTERNAL_ASSERT(C == (transposed_weight ? weight.size(0) : weight.size(1)));
  const Kernels& kernels = kernels_for(isa, C, K);
  const Tiles tl = tiles_of(x);
  at::Tensor y = at::empty({tl.n, K, tl.h, tl.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const std::vector<float> u = transform_weight(weight, transposed_weight);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* bias_data = bias ? b.const_data_ptr<float>() : nullptr;
  const float* in = x.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(kPoints * kBlockTiles * C), m(kPoints * kBlockTiles * K);
    kernels.conv_blocks(in, u.data(), bias_data, C, K, tl, begin, end, out, v.data(), m.data());
  });
  return y;
}

at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad, Isa isa) {
  const int64_t C = x.size(1), K = grad.size(1);
  const Kernels& kernels = kernels_for(isa, C, K);
  const Tiles tl = tiles_of(grad);
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  // one float partial per chunk, summed in chunk order in double: the same result for
  // any number of threads
  const int64_t size = kPoints * C * K;
  std::vector<float> partial(chunks * size, 0.f);
  const float* in = x.const_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(kPoints * kBlockTiles * C), e(kPoints * kBlockTiles * K);
    for (int64_t chunk = begin; chunk < end; ++chunk)
      kernels.weight_grad_chunk(in, g, C, K, tl, chunk, partial.data() + chunk * size, v.data(), e.data());
  });
  at::Tensor w = at::empty({K, C, 3, 3}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* out = w.mutable_data_ptr<float>();
  // per input channel: the chunks' sums (each entry in chunk order), then dW = G^T M G
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(kPoints * K);  // [p][k] of channel c
    for (int64_t c = begin; c < end; ++c) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        for (int p = 0; p < kPoints; ++p) {
          const float* row = partial.data() + chunk * size + (p * C + c) * K;
          for (int64_t k = 0; k < K; ++k) total[p * K + k] += row[k];
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        double m[kWindow][kWindow];
        for (int p = 0; p < kPoints; ++p) m[p / kWindow][p % kWindow] = total[p * K + k];
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

}  // namespace vggbench::cpu
