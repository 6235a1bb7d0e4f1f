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

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#define VGGBENCH_WINOGRAD 1
#else
#define VGGBENCH_WINOGRAD 0
#endif

namespace vggbench::cpu {
namespace {

using winograd::kBlockTiles, winograd::kGradBlockTiles, winograd::kPoints, winograd::kTile,
    winograd::kWindow, winograd::Activation, winograd::Kernels, winograd::Tiles;

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

// A conv weight (K, C, 3, 3) in float32, read through its strides: a float32 weight of any
// layout is not copied.
class FloatWeight {
 public:
  explicit FloatWeight(const at::Tensor& weight)
      : w_(weight.to(at::kFloat)), data_(w_.const_data_ptr<float>()),
        stride_{w_.stride(0), w_.stride(1), w_.stride(2), w_.stride(3)} {}
  int64_t outputs() const { return w_.size(0); }
  int64_t inputs() const { return w_.size(1); }
  // tap (i, j) of the filter from input channel c to output channel k
  float operator()(int64_t k, int64_t c, int64_t i, int64_t j) const {
    return data_[k * stride_[0] + c * stride_[1] + i * stride_[2] + j * stride_[3]];
  }

 private:
  at::Tensor w_;
  const float* data_;
  std::array<int64_t, 4> stride_;
};

// Filters per step of the transforms between 3x3 filters and their 6x6 Winograd points:
// their buffers (~14 KB of doubles) stay in L1, and the loops over filters vectorise.
constexpr int64_t kFilterStep = 64;

// U[a*6+b][c][k] = (G w G^T)[a][b] for each 3x3 filter w from channel c to k (double, one
// side at a time, filters innermost so that the compiler vectorises across them). Serial
// below ~16K filters: for the study's 32x32 it takes a few microseconds, less than
// starting the threads costs on a busy machine.
std::vector<float> transform_weight(const at::Tensor& weight, bool transposed) {
  const FloatWeight w(weight);
  const int64_t K = w.outputs(), C = w.inputs(), filters = K * C;
  // the conv's output and input channels: swapped for the transposed (input-gradient) conv
  const int64_t out_ch = transposed ? C : K;
  std::vector<float> u(kPoints * filters);
  const int64_t steps = (filters + kFilterStep - 1) / kFilterStep;
  at::parallel_for(0, steps, 256, [&](int64_t begin, int64_t end) {
    double g[9][kFilterStep], half[kWindow][3][kFilterStep];  // g, then G g
    for (int64_t step = begin; step < end; ++step) {
      // filter f of U's [in][out] order: (row, col) = (c, k), transposed (k, c)
      const int64_t first = step * kFilterStep, count = std::min(kFilterStep, filters - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = (first + i) / out_ch, col = (first + i) % out_ch;
        const int64_t k = transposed ? row : col, c = transposed ? col : row;
        for (int t = 0; t < 9; ++t) {
          const int tap = transposed ? 8 - t : t;  // flipped: tap 8 - t
          g[t][i] = w(k, c, tap / 3, tap % 3);
        }
      }
      for (int a = 0; a < kWindow; ++a)
        for (int j = 0; j < 3; ++j)
          for (int64_t i = 0; i < count; ++i)
            half[a][j][i] = kG[a][0] * g[j][i] + kG[a][1] * g[3 + j][i] + kG[a][2] * g[6 + j][i];
      for (int a = 0; a < kWindow; ++a)
        for (int b = 0; b < kWindow; ++b) {
          float* out = u.data() + (a * kWindow + b) * filters + first;
          for (int64_t i = 0; i < count; ++i)
            out[i] = static_cast<float>(half[a][0][i] * kG[b][0] + half[a][1][i] * kG[b][1] +
                                        half[a][2][i] * kG[b][2]);
        }
    }
  });
  return u;
}

// A bfloat16 tensor's data as the kernels take it: its bits.
const uint16_t* bits_of(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}
uint16_t* mutable_bits_of(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<at::BFloat16>());
}

// Uninitialised scratch for the kernels (zeroing it would cost a pass over memory).
std::unique_ptr<float[]> scratch(int64_t floats) { return std::unique_ptr<float[]>(new float[floats]); }

bool cpu_has_avx2_fma() {
#if VGGBENCH_WINOGRAD
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if VGGBENCH_WINOGRAD && defined(VGGBENCH_EMULATE_AVX512)
  return cpu_has_avx2_fma();  // the emulated build's "AVX-512" runs on AVX2 (winograd_avx512.cpp)
#elif VGGBENCH_WINOGRAD
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// Whether ONEDNN_MAX_CPU_ISA (read by oneDNN; the forced-AVX2 runs set it) lets oneDNN use an
// instruction set whose name has one of `markers` (unset, ALL or DEFAULT: no cap).
bool onednn_allows(std::initializer_list<const char*> markers) {
  const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  const std::string name(cap);
  if (name == "ALL" || name == "DEFAULT") return true;
  return std::any_of(markers.begin(), markers.end(),
                     [&](const char* marker) { return name.find(marker) != std::string::npos; });
}

// Whether oneDNN runs ATen's bfloat16 convs on AMX tiles: the CPU has AMX-BF16 (CPUID leaf 7
// EDX bit 22), the OS saves the tile state (XCR0 bits 17-18), and ONEDNN_MAX_CPU_ISA does not
// cap oneDNN below AMX. There native
// bfloat16 took 0.3-0.45x the time of these kernels' float32 arithmetic at the study's shapes
// (N=100, 32 channels, 32x32 to 8x8 maps, one thread); without AMX (ONEDNN_MAX_CPU_ISA=
// AVX512_CORE_BF16 or AVX2) native bfloat16 took 2.5x to over 10x their time.
bool native_bf16_on_amx() {
#if VGGBENCH_WINOGRAD
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22))) return false;
  unsigned xcr0_low = 0, xcr0_high = 0;
  asm volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & (3u << 17)) != (3u << 17)) return false;
  return onednn_allows({"AMX"});
#else
  return false;
#endif
}

// Whether oneDNN may use AVX512-BF16's dot products (CPUID leaf 7 subleaf 1 EAX bit 5): the
// AVX512_CORE_BF16 set or a later one (every later name has BF16, FP16, AMX or AVX10 in it).
bool onednn_avx512_bf16() {
#if VGGBENCH_WINOGRAD
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return cpu_has_avx512() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) &&
         onednn_allows({"BF16", "FP16", "AMX", "AVX10"});
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

bool native_bf16_dot_products() {
  static const bool cpu = onednn_avx512_bf16() || native_bf16_on_amx();
  return cpu && at::globalContext().userEnabledMkldnn();
}

bool winograd_takes_bfloat16() {
  static const bool bf16 = !native_bf16_on_amx();
  return bf16 && winograd_isa() != Isa::kNone;
}

bool winograd_applies_channels_last(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                    int64_t padding) {
  const auto dtype = x.scalar_type();
  return winograd_isa() != Isa::kNone && x.device().is_cpu() &&
         (dtype == at::kFloat || (dtype == at::kBFloat16 && winograd_takes_bfloat16())) &&
         weight.scalar_type() == dtype && x.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
         stride == 1 && padding == 1 && x.size(1) % 8 == 0 && weight.size(0) % 8 == 0 && x.numel() > 0;
}

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding) {
  return winograd_applies_channels_last(x, weight, stride, padding) &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

namespace {

// z[0, k, 0, 0] of conv2d(x, weight, padding=1), in double: a value near channel k's
// outputs, the shift of ChannelSums.
std::vector<double> first_outputs(const at::Tensor& x, const at::Tensor& weight) {
  const FloatWeight w(weight);
  const int64_t K = w.outputs(), C = w.inputs(), H = x.size(2), W = x.size(3);
  // the data pointers, taken once: taking one checks the tensor (~20 ns, here 4 C K times)
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::BFloat16* x_bf16 = bf16 ? x.const_data_ptr<at::BFloat16>() : nullptr;
  const float* x_float = bf16 ? nullptr : x.const_data_ptr<float>();
  const auto input = [&](int64_t c, int64_t h, int64_t col) {  // x[0, c, h, col], channels_last
    const int64_t i = (h * W + col) * C + c;
    return bf16 ? static_cast<double>(static_cast<float>(x_bf16[i])) : static_cast<double>(x_float[i]);
  };
  std::vector<double> z(K, 0.0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 1; i < 3 && i - 1 < H; ++i)
        for (int64_t j = 1; j < 3 && j - 1 < W; ++j)
          z[k] += input(c, i - 1, j - 1) * static_cast<double>(w(k, c, i, j));
  return z;
}

// winograd_conv, and with `sums` its output's ChannelSums, or with `act` its outputs' activation.
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                bool transposed_weight, Isa isa, ChannelSums* sums, const Activation* act = nullptr) {
  const int64_t C = x.size(1), K = transposed_weight ? weight.size(1) : weight.size(0);
  TORCH_INTERNAL_ASSERT(C == (transposed_weight ? weight.size(0) : weight.size(1)));
  const Kernels& kernels = kernels_for(isa, C, K);
  const Tiles tl = tiles_of(x);
  at::Tensor y = at::empty({tl.n, K, tl.h, tl.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const std::vector<float> u = transform_weight(weight, transposed_weight);
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_data = bias ? b.const_data_ptr<float>() : nullptr;
  const int64_t blocks = (tl.count() + kBlockTiles - 1) / kBlockTiles;
  std::vector<float> shift;
  std::vector<double> block_sums;  // blocks x 2 x K
  if (sums) {
    TORCH_INTERNAL_ASSERT(!transposed_weight && !bias);
    const std::vector<double> first = first_outputs(x, weight);
    shift.assign(first.begin(), first.end());
    sums->shift.assign(shift.begin(), shift.end());  // the float values the kernels subtract
    block_sums.resize(blocks * 2 * K);
  }
  const auto run = [&](const auto& typed, const auto* in, auto* out) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const auto v = scratch(kPoints * kBlockTiles * C), m = scratch(kPoints * kBlockTiles * K);
      typed.conv_blocks(in, u.data(), bias_data, C, K, tl, begin, end, out, v.get(), m.get(),
                        sums ? shift.data() : nullptr, block_sums.data(), act);
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(kernels.bf16, bits_of(x), mutable_bits_of(y));
  } else {
    run(kernels.f32, x.const_data_ptr<float>(), y.mutable_data_ptr<float>());
  }
  if (sums) {
    sums->sum.assign(K, 0.0), sums->sum_sq.assign(K, 0.0);
    for (int64_t block = 0; block < blocks; ++block) {
      const double* partial = block_sums.data() + block * 2 * K;
      for (int64_t k = 0; k < K; ++k) sums->sum[k] += partial[k], sums->sum_sq[k] += partial[K + k];
    }
  }
  return y;
}

}  // namespace

at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed_weight, Isa isa) {
  return conv(x, weight, bias, transposed_weight, isa, nullptr);
}

at::Tensor winograd_conv_sums(const at::Tensor& x, const at::Tensor& weight, ChannelSums& sums, Isa isa) {
  return conv(x, weight, std::nullopt, /*transposed_weight=*/false, isa, &sums);
}

at::Tensor winograd_conv_act(const at::Tensor& x, const at::Tensor& weight, const float* scale,
                             const float* shift, float slope, Isa isa) {
  TORCH_INTERNAL_ASSERT((scale == nullptr) == (shift == nullptr));
  const Activation act{scale, shift, slope, scale != nullptr};
  return conv(x, weight, std::nullopt, /*transposed_weight=*/false, isa, nullptr, &act);
}

namespace {

// The weight gradient's partial sums: `count` runs of consecutive blocks (of
// kGradBlockTiles tiles), run i from blocks * i / count, so they differ by at most one
// block. The split depends on the shape only, never on the threads, which keeps the sums (and
// so the result) the same for any thread count. ~kRunTiles (1152) tiles per run, an even
// number of runs (so that two threads get equal shares: the 8x8 maps of a batch of 100 have
// only 12 blocks), while the runs' partial sums stay within ~64 MB. (Runs cost a pass over their
// partial sums each: with ~288 tiles per run, summing the 24 runs of a 32x32 map of a batch
// of 100 took ~10% of the gradient's time.)
struct Runs {
  int64_t blocks, count;
  int64_t first(int64_t run) const { return blocks * run / count; }
};

Runs runs_of(int64_t blocks, int64_t partial_floats) {
  constexpr int64_t kRunTiles = 1152, kRunBlocks = kRunTiles / kGradBlockTiles;
  constexpr int64_t kBudgetFloats = int64_t{16} << 20;
  const int64_t wanted = ((blocks + kRunBlocks - 1) / kRunBlocks + 1) / 2 * 2;
  const int64_t affordable = std::max<int64_t>(1, kBudgetFloats / partial_floats);
  return {blocks, std::max<int64_t>(1, std::min({wanted, affordable, blocks}))};
}

}  // namespace

at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad, Isa isa) {
  const int64_t C = x.size(1), K = grad.size(1);
  const Kernels& kernels = kernels_for(isa, C, K);
  const Tiles tl = tiles_of(grad);
  const int64_t size = kPoints * C * K;
  const Runs runs = runs_of((tl.count() + kGradBlockTiles - 1) / kGradBlockTiles, size);
  // one float partial per run, summed in run order in double: the same result for any
  // number of threads
  const auto partial = scratch(runs.count * size);
  const auto sum_runs = [&](const auto& typed, const auto* in, const auto* g) {
    at::parallel_for(0, runs.count, 1, [&](int64_t begin, int64_t end) {
      const auto v = scratch(kPoints * kGradBlockTiles * C), e = scratch(kPoints * kGradBlockTiles * K);
      for (int64_t run = begin; run < end; ++run)
        typed.weight_grad_blocks(in, g, C, K, tl, runs.first(run), runs.first(run + 1),
                                 partial.get() + run * size, v.get(), e.get());
    });
  };
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) {
    sum_runs(kernels.bf16, bits_of(x), bits_of(grad));
  } else {
    sum_runs(kernels.f32, x.const_data_ptr<float>(), grad.const_data_ptr<float>());
  }
  // channels_last, as the activations: the layout the caller returns it in (no copy there)
  at::Tensor w = at::empty({K, C, 3, 3}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  float* out = w.mutable_data_ptr<float>();
  // per input channel: the runs' sums (each entry in run order), then dW = G^T M G, output
  // channels innermost so that the compiler vectorises across them
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(kPoints * K), half(kWindow * 3 * K), dw(9 * K);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t run = 0; run < runs.count; ++run) {
        for (int p = 0; p < kPoints; ++p) {
          const float* row = partial.get() + run * size + (p * C + c) * K;
          double* sum = total.data() + p * K;
          for (int64_t k = 0; k < K; ++k) sum[k] += row[k];
        }
      }
      std::fill(half.begin(), half.end(), 0.0);  // half[a][j] = sum_b M[a][b] G[b][j]
      for (int a = 0; a < kWindow; ++a)
        for (int j = 0; j < 3; ++j)
          for (int b = 0; b < kWindow; ++b) {
            const double* m = total.data() + (a * kWindow + b) * K;
            double* h = half.data() + (a * 3 + j) * K;
            for (int64_t k = 0; k < K; ++k) h[k] += m[k] * kG[b][j];
          }
      std::fill(dw.begin(), dw.end(), 0.0);  // dW[i][j] = sum_a G[a][i] half[a][j]
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
          for (int a = 0; a < kWindow; ++a) {
            const double* h = half.data() + (a * 3 + j) * K;
            double* d = dw.data() + (i * 3 + j) * K;
            for (int64_t k = 0; k < K; ++k) d[k] += kG[a][i] * h[k];
          }
      for (int64_t k = 0; k < K; ++k)
        for (int t = 0; t < 9; ++t) out[(k * 9 + t) * C + c] = static_cast<float>(dw[t * K + k]);
    }
  });
  return bf16 ? w.to(at::kBFloat16) : w;  // rounded once, from the float32 sums
}

}  // namespace vggbench::cpu
