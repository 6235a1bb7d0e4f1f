// The CPU passes over activations of the fused unit (see ../fused_unit.h): float, double
// and bfloat16 activations. Compiled three times, into each file's own anonymous namespace:
// for the baseline x86-64 ISA (fused_unit_kernel.cpp), for AVX2 (fused_unit_kernel_avx2.cpp)
// and for AVX-512 F/BW/VL (fused_unit_kernel_avx512.cpp); fused_unit_kernel.cpp uses the
// widest the CPU has (capped by VGGBENCH_CPU_ISA, as the Winograd kernels). No build may
// contract into FMAs (fp-contract off: the baseline and AVX2 have none), so all give the
// same bits; apply_weight_grad's products alone are summed with explicit FMAs in the AVX
// builds (the same bits in both; the baseline build, for CPUs without AVX2, rounds twice).
//
// Every pass runs in steps of vectors (lanes.h) along the contiguous dimension: NHWC steps
// hold kWidth consecutive channels of one row (a register of floats: the per-channel
// operands are one vector load each), NCHW steps consecutive values of one channel.
// Reductions run over fixed blocks of rows, combined in block order, so results do not
// depend on the number of threads. Within a block, values are summed in the compute type
// (float for float/bfloat16) over spans of a few values per channel, and the spans in
// double: float rounding over at most kSpan / kLanes = kRows terms in a row (NCHW: kLanes
// partial sums over kSpan values; NHWC: kRows rows, each lane of the W sums held in a
// register over the span). Per-element options (residual, recovery of xhat, ...) are
// template parameters, so every inner loop is branch-free.
#pragma once
// GCC notes that lanes.h's vectors, wider than the baseline's registers, change the ABI of
// the functions taking them: those compiled outside the target pragmas below (lanes.h and
// the shared formulas, VGGBENCH_HD) are always inlined, so no call crosses builds
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../affine_view.h"
#include "../backward_view.h"
#include "lanes.h"
#include "transpose.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

// after every include: only the passes below are compiled for AVX2, nothing shared with
// the baseline build
#if defined(VGGBENCH_CPU_PASSES_AVX2) || defined(VGGBENCH_CPU_PASSES_AVX512)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#ifdef VGGBENCH_CPU_PASSES_AVX2
#pragma GCC target("avx2")
#endif
#if defined(VGGBENCH_CPU_PASSES_AVX512) && defined(VGGBENCH_EMULATE_AVX512)
#pragma GCC target("avx2,fma")  // the emulated AVX-512 build (lanes.h): its vectors in AVX2 halves
#elif defined(VGGBENCH_CPU_PASSES_AVX512)
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,prefer-vector-width=512")
#endif

// A pass's per-step function: always inlined into its loop. (GCC otherwise calls the larger
// ones once per step, their operands and results going through memory.)
#define VGGBENCH_STEP __attribute__((always_inline))

namespace vggbench {
namespace {

constexpr int64_t kBlockElements = 1 << 15;  // elements per reduction block (~L2-sized)
constexpr int64_t kSpan = 256;               // values per channel summed before widening
constexpr int kLanes = 8;                    // NCHW: partial sums along a contiguous run
constexpr int64_t kRows = kSpan / kLanes;    // NHWC: rows summed per channel before widening
constexpr int kWidth = kRegisterBytes / 4;   // NHWC: channels per step, a register of floats

// fn(flags...) with each runtime bool turned into std::true_type / std::false_type, so
// per-element options become compile-time constants (`if constexpr`).
template <typename F>
void with_flags(F fn) {
  fn();
}
template <typename F, typename... Rest>
void with_flags(F fn, bool first, Rest... rest) {
  if (first) {
    with_flags([&](auto... flags) { fn(std::true_type{}, flags...); }, rest...);
  } else {
    with_flags([&](auto... flags) { fn(std::false_type{}, flags...); }, rest...);
  }
}

// One step of a pass: L lanes of the activations from offset i, the first `count` of them
// valid (all when Full; the others read as 0 and are not written). Values in T.
template <typename T, int L, bool Full>
struct Step {
  static constexpr bool kFull = Full;
  int64_t i, count;
  template <typename S>
  Lanes<T, L> load(const S* p) const {
    if constexpr (Full) return load_lanes<T, L>(p + i);
    return load_some<T, L>(p + i, count);
  }
  template <typename S>
  void store(S* p, Lanes<T, L> v) const {
    if constexpr (Full) return store_lanes(p + i, v);
    store_some(p + i, v, count);
  }
};

// A step's per-channel operands from tables of C values: NHWC steps span `count` channels
// from c0 (ChannelLanes), NCHW ones a run of one channel c (ChannelBroadcast: its value in
// every lane).
template <int L, bool Full>
struct ChannelLanes {
  int64_t c0, count;
  template <typename T>
  Lanes<T, L> operator()(const T* table) const {
    return Step<T, L, Full>{c0, count}.load(table);
  }
};
template <int L>
struct ChannelBroadcast {
  int64_t c;
  template <typename T>
  Lanes<T, L> operator()(const T* table) const {
    return Lanes<T, L>(table[c]);
  }
};

// Asks for the cache lines kPrefetchAhead elements past a step's in each tensor given (the
// steps run through memory in order, NHWC and NCHW alike): the backward passes otherwise wait
// on their loads (AVX-512 build: backward_reduce took ~15% longer, N=100 32x32x32 float32,
// 1 thread; the AVX2 build, slower per element, and normalize_act gain nothing). Null
// pointers are skipped; a prefetch past the end of a tensor reads nothing.
constexpr int64_t kPrefetchAhead = 2048;
template <typename Step, typename... S>
inline __attribute__((always_inline)) void prefetch_ahead(const Step& at, const S*... data) {
  ((data ? __builtin_prefetch(reinterpret_cast<const char*>(data) +
                              (at.i + kPrefetchAhead) * static_cast<int64_t>(sizeof(S)))
         : void()),
   ...);
}

// visit(channels, step(i)) for the NHWC chunks of kWidth channels of one row: channels
// gives the chunk's per-channel operands, step(i) the Step at offset i of the chunk's first
// channel in a row.
template <typename acc_t, typename Visit>
void for_channel_chunks(int64_t C, Visit visit) {
  const auto chunk = [&](int64_t c0, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const int64_t n = std::min<int64_t>(kWidth, C - c0);
    visit(ChannelLanes<kWidth, kFull>{c0, n}, [n](int64_t i) { return Step<acc_t, kWidth, kFull>{i, n}; });
  };
  int64_t c0 = 0;
  for (; c0 + kWidth <= C; c0 += kWidth) chunk(c0, std::true_type{});
  if (c0 < C) chunk(c0, std::false_type{});
}

// visit(step) over the Steps of L lanes covering n values from `base`.
template <typename acc_t, int L, typename Visit>
void for_run(int64_t base, int64_t n, Visit visit) {
  int64_t i = 0;
  for (; i + L <= n; i += L) visit(Step<acc_t, L, true>{base + i, L});
  if (i < n) visit(Step<acc_t, L, false>{base + i, n - i});
}

// Per-channel sums of W values per element: value(step, k, v) sets them (v: W Lanes) for a
// step's lanes, k = operands(channels) the step's per-channel operands.
// Returns W*C doubles (entry w*C + c), blocks of rows combined in order.
template <typename acc_t, int W, typename Operands, typename Value>
std::vector<double> reduce_channels(const Geometry& g, Operands operands, Value value) {
  const int64_t C = g.channels;
  const int64_t rows = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, C * g.inner));
  const int64_t blocks = (g.outer + rows - 1) / rows;
  std::vector<double> partial(blocks * W * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // local copies: their captures stay in registers, not re-read after every store
    const Operands operands_of = operands;
    const Value value_of = value;
    for (int64_t b = begin; b < end; ++b) {
      double* out = partial.data() + b * W * C;
      const int64_t first = b * rows, last = std::min(g.outer, first + rows);
      if (g.inner == 1) {  // NHWC: channels contiguous, each lane accumulates one channel
        for (int64_t o = first; o < last; o += kRows) {
          const int64_t o_end = std::min(last, o + kRows);
          for_channel_chunks<acc_t>(C, [&](auto channels, auto step) {
            const auto k = operands_of(channels);
            Lanes<acc_t, kWidth> acc[W] = {};
            for (int64_t r = o; r < o_end; ++r) {
              Lanes<acc_t, kWidth> v[W];
              value_of(step(r * C + channels.c0), k, v);
#pragma GCC unroll 8
              for (int w = 0; w < W; ++w) acc[w] = acc[w] + v[w];
            }
            for (int w = 0; w < W; ++w) {  // widened: out[w * C + c] += acc[w] lane by lane
              const auto at = step(w * C + channels.c0);
              const Step<double, kWidth, decltype(at)::kFull> wide{at.i, at.count};
              wide.store(out, wide.load(out) + Lanes<double, kWidth>(acc[w]));
            }
          });
        }
        continue;
      }
      for (int64_t o = first; o < last; ++o) {  // NCHW: a contiguous run per channel
        for (int64_t c = 0; c < C; ++c) {
          const auto k = operands_of(ChannelBroadcast<kLanes>{c});
          const int64_t base = (o * C + c) * g.inner;
          for (int64_t s = 0; s < g.inner; s += kSpan) {
            Lanes<acc_t, kLanes> acc[W] = {};
            for_run<acc_t, kLanes>(base + s, std::min(kSpan, g.inner - s), [&](auto step) {
              Lanes<acc_t, kLanes> v[W];
              value_of(step, k, v);
              if constexpr (!decltype(step)::kFull) {  // the lanes past the run's end add 0
                acc_t past[kLanes];
                for (int l = 0; l < kLanes; ++l) past[l] = acc_t(l < step.count ? 0 : 1);
                const auto is_past = load_lanes<acc_t, kLanes>(past) > Lanes<acc_t, kLanes>(0);
                for (int w = 0; w < W; ++w) v[w] = select(is_past, Lanes<acc_t, kLanes>(0), v[w]);
              }
              for (int w = 0; w < W; ++w) acc[w] = acc[w] + v[w];
            });
            for (int w = 0; w < W; ++w) {
              for (int l = 0; l < kLanes; ++l) out[w * C + c] += double(acc[w][l]);
            }
          }
        }
      }
    }
  });
  std::vector<double> total(W * C, 0.0);  // an empty batch: sums 0
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < W * C; ++j) total[j] += partial[b * W * C + j];
  }
  return total;
}

// fn(step, k) over every element, k = operands(channels) the step's per-channel operands,
// in parallel over rows; steps of kWidth lanes along the contiguous dimension (H*W for
// NCHW, the channels for NHWC).
template <typename acc_t, typename Operands, typename F>
void for_each_step(const Geometry& g, Operands operands, F fn) {
  const int64_t C = g.channels;
  const int64_t grain = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, C * g.inner));
  at::parallel_for(0, g.outer, grain, [&](int64_t first, int64_t end) {
    // local copies: their captures stay in registers, not re-read after every store
    const Operands operands_of = operands;
    const F fn_of = fn;
    if (g.inner == 1) {  // NHWC: row by row (a stream), the operands re-read from L1
      for (int64_t r = first; r < end; ++r) {
        for_channel_chunks<acc_t>(C, [&](auto channels, auto step) {
          fn_of(step(r * C + channels.c0), operands_of(channels));
        });
      }
      return;
    }
    for (int64_t o = first; o < end; ++o) {
      for (int64_t c = 0; c < C; ++c) {
        const auto k = operands_of(ChannelBroadcast<kWidth>{c});
        for_run<acc_t, kWidth>((o * C + c) * g.inner, g.inner, [&](auto step) { fn_of(step, k); });
      }
    }
  });
}

Tensor channel_tensor(const std::vector<double>& values, int64_t offset, int64_t channels,
                      const Tensor& like) {
  Tensor t = at::empty({channels}, like.options().dtype(stats_dtype(like.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "vggbench_channel_tensor", [&] {
    auto* out = t.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(values[offset + c]);
  });
  return t;
}

// Per-channel mean (plus the bias, in z's dtype) and biased variance of z from the sums of
// d = z - shift and of d^2 over `count` values per channel (an empty batch: 0 and 0), as z's
// statistics tensors: batch_stats's finish, and the Winograd conv_stats'.
std::tuple<Tensor, Tensor> stats_from_sums(const double* sum, const double* sum_sq, const double* shift,
                                           int64_t count, const OptTensor& bias, const Tensor& z) {
  const int64_t C = geometry_of(z).channels;
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  if (count > 0) {
    for (int64_t c = 0; c < C; ++c) {
      math::mean_var(sum[c], sum_sq[c], shift[c], static_cast<double>(count), mean[c], var[c]);
    }
    if (bias) {
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, bias->scalar_type(), "vggbench_stats_bias", [&] {
        const scalar_t* b = bias->const_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<double>(b[c]);
      });
    }
  }
  return {channel_tensor(mean, 0, C, z), channel_tensor(var, 0, C, z)};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& z, const OptTensor& bias) {
  RECORD_FUNCTION("vggbench::cpu::batch_stats", {});  // the pass, in profiles
  const Geometry g = geometry_of(z);
  const int64_t C = g.channels;
  std::vector<double> sums(2 * C, 0.0), shift(C, 0.0);
  if (g.count() > 0) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = z.const_data_ptr<scalar_t>();
    // sums of z - shift, shift = one sample of the channel: no cancellation when |mean| >> std
    std::vector<acc_t> channel_shift(C);
    for (int64_t c = 0; c < C; ++c) channel_shift[c] = static_cast<acc_t>(data[c * g.inner]);
    const acc_t* sh = channel_shift.data();
    sums = reduce_channels<acc_t, 2>(
        g, [=](auto channels) { return channels(sh); },
        [=](auto at, auto lanes_shift, auto (&terms)[2]) VGGBENCH_STEP {
          const auto d = at.load(data) - lanes_shift;
          terms[0] = d, terms[1] = d * d;
        });
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(channel_shift[c]);
  });
  return stats_from_sums(sums.data(), sums.data() + C, shift.data(), g.count(), bias, z);
}

// Per channel (scale, shift) of `a` (normalize_act's v * scale + shift), C of each.
template <typename scalar_t>
std::array<std::vector<at::opmath_type<scalar_t>>, 2> affine_coefficients(const ChannelAffine& a, int64_t C) {
  std::array<std::vector<at::opmath_type<scalar_t>>, 2> k{std::vector<at::opmath_type<scalar_t>>(C),
                                                          std::vector<at::opmath_type<scalar_t>>(C)};
  const AffineOperands<scalar_t> operands(a);
  for (int64_t c = 0; c < C; ++c) {
    const auto coefficients = operands.of(c);
    k[0][c] = coefficients.scale, k[1][c] = coefficients.shift;
  }
  return k;
}

void normalize_act(const Tensor& z, const ChannelAffine& a, const OptTensor& residual, double slope,
                   const Tensor& out) {
  RECORD_FUNCTION("vggbench::cpu::normalize_act", {});  // the pass, in profiles
  const Geometry g = geometry_of(z);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [scale, shift] = affine_coefficients<scalar_t>(a, g.channels);
    const scalar_t* in = z.const_data_ptr<scalar_t>();
    const scalar_t* res = data_or_null<scalar_t>(residual);
    const acc_t *sc = scale.data(), *sh = shift.data();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(slope);
    with_flags([&](auto affine, auto add_residual) {
      for_each_step<acc_t>(
          g, [=](auto channels) { return std::array{channels(sc), channels(sh)}; },
          [=](auto at, const auto& k) VGGBENCH_STEP {
            using V = std::decay_t<decltype(k[0])>;
            V v = at.load(in);
            if constexpr (affine) v = v * k[0] + k[1];
            if constexpr (add_residual) v = v + at.load(res);
            at.store(y, math::leaky_relu(v, V(s)));
          });
    }, a.transforms(), res != nullptr);
  });
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& batch_mean,
                          const Tensor& batch_var, const OptTensor& count, int64_t batch_count,
                          std::optional<double> momentum) {
  RECORD_FUNCTION("vggbench::cpu::update_running_stats", {});  // the pass, in profiles
  int64_t tracked = 0;
  AT_DISPATCH_INTEGRAL_TYPES(num_batches_tracked.scalar_type(), "vggbench_batches_tracked", [&] {
    scalar_t* n = num_batches_tracked.mutable_data_ptr<scalar_t>();
    tracked = static_cast<int64_t>(*n += 1);
  });
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "vggbench_update_running_stats", [&] {
    using stats_t = scalar_t;
    const stats_t n = count ? *count->const_data_ptr<stats_t>() : static_cast<stats_t>(batch_count);
    const stats_t factor = static_cast<stats_t>(momentum ? *momentum : 1.0 / static_cast<double>(tracked));
    const stats_t *bm = batch_mean.const_data_ptr<stats_t>(), *bv = batch_var.const_data_ptr<stats_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "vggbench_running", [&] {
      scalar_t *rm = running_mean.mutable_data_ptr<scalar_t>(), *rv = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < batch_mean.numel(); ++c) {
        stats_t m = static_cast<stats_t>(rm[c]), v = static_cast<stats_t>(rv[c]);
        math::running_update(bm[c], bv[c], n, factor, m, v);
        rm[c] = static_cast<scalar_t>(m), rv[c] = static_cast<scalar_t>(v);
      }
    });
  });
}

// BackwardView::Channel of every channel, stored field by field: a step loads each field of
// consecutive channels (NHWC) with one vector load, where an array of structs would need
// gathers.
template <typename scalar_t>
struct ChannelTable {
  using View = BackwardView<scalar_t>;
  using acc_t = typename View::acc_t;
  using rec_t = typename View::rec_t;
  std::vector<rec_t> recover_scale, recover_shift;
  std::vector<acc_t> gamma, beta, invstd, centre;

  ChannelTable(const View& view, int64_t channels)
      : recover_scale(channels), recover_shift(channels), gamma(channels), beta(channels),
        invstd(channels), centre(channels) {
    for (int64_t c = 0; c < channels; ++c) {
      const typename View::Channel ch = view.channel(c);
      recover_scale[c] = ch.recover_scale, recover_shift[c] = ch.recover_shift;
      gamma[c] = ch.gamma, beta[c] = ch.beta, invstd[c] = ch.invstd, centre[c] = ch.centre;
    }
  }

  // The fields' data, copied into the lambdas of the passes.
  struct Pointers {
    const rec_t *recover_scale, *recover_shift;
    const acc_t *gamma, *beta, *invstd, *centre;
    // A step's channels (ChannelLanes or ChannelBroadcast) as a BackwardChannel of lanes.
    template <typename Channels>
    auto operator()(Channels channels) const {
      using A = decltype(channels(gamma));
      using R = decltype(channels(recover_scale));
      return BackwardChannel<A, R>{channels(recover_scale), channels(recover_shift), channels(gamma),
                                   channels(beta),          channels(invstd),        channels(centre)};
    }
  };
  Pointers pointers() const {
    return {recover_scale.data(), recover_shift.data(), gamma.data(), beta.data(), invstd.data(),
            centre.data()};
  }
};

// The residual's lanes of a step, 0 without one.
template <bool HasResidual, typename Step, typename scalar_t>
auto residual_of(const Step& at, const scalar_t* res) {
  using V = decltype(at.load(res));
  if constexpr (HasResidual) {
    return at.load(res);
  } else {
    return V(0);
  }
}

// Per channel (scale, shift) giving xhat = in.xhat * scale + shift: in.xhat_affine's, as
// normalize_act computes them, or (1, 0) when in.xhat holds xhat itself.
template <typename scalar_t>
std::array<std::vector<at::opmath_type<scalar_t>>, 2> xhat_coefficients(const BackwardInputs& in,
                                                                        int64_t channels) {
  using acc_t = at::opmath_type<scalar_t>;
  if (in.xhat_affine) return affine_coefficients<scalar_t>(*in.xhat_affine, channels);
  return {std::vector<acc_t>(channels, acc_t(1)), std::vector<acc_t>(channels, acc_t(0))};
}

std::tuple<Tensor, Tensor, Tensor> backward_reduce(const BackwardInputs& in) {
  RECORD_FUNCTION("vggbench::cpu::backward_reduce", {});  // the pass, in profiles
  const Geometry g = geometry_of(in.out);
  const int64_t C = g.channels;
  constexpr int kTerms = math::kRecoveryTerms;
  std::vector<double> sums, flags(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardView<scalar_t> e(in);
    if (in.xhat) {  // sum(g), sum(g * xhat)
      const auto [scale, shift] = xhat_coefficients<scalar_t>(in, C);
      const acc_t *sc = scale.data(), *sh = shift.data();
      sums = reduce_channels<acc_t, 2>(
          g, [=](auto channels) { return std::array{channels(sc), channels(sh)}; },
          [=](auto at, const auto& k, auto (&terms)[2]) VGGBENCH_STEP {
            prefetch_ahead(at, e.y, e.dy, e.xhat);
            const auto gi = e.g_of(at.load(e.y), at.load(e.dy));
            terms[0] = gi, terms[1] = gi * (at.load(e.xhat) * k[0] + k[1]);
          });
      return;
    }
    const ChannelTable<scalar_t> table(e, C);
    with_flags([&](auto has_res) {  // the recovery rule's terms, sum(g) and sum(g * xhat) first
      sums = reduce_channels<acc_t, kTerms>(
          g, table.pointers(), [=](auto at, const auto& ch, auto (&terms)[kTerms]) VGGBENCH_STEP {
            prefetch_ahead(at, e.y, e.dy, has_res ? e.res : nullptr);
            e.recovery_terms_of(at.load(e.y), at.load(e.dy), residual_of<has_res>(at, e.res), ch, terms);
          });
    }, in.residual.has_value());
    for (int64_t c = 0; c < C; ++c) {
      acc_t channel[kTerms];
      for (int w = 0; w < kTerms; ++w) channel[w] = static_cast<acc_t>(sums[w * C + c]);
      flags[c] = e.recompute_flag(channel, static_cast<acc_t>(g.count()), e.channel(c));
    }
  });
  return {channel_tensor(sums, 0, C, in.out), channel_tensor(sums, C, C, in.out),
          channel_tensor(flags, 0, C, in.out)};
}

// backward_apply's per-element step, set up once per call: body(operands, step) runs with
// step(at, operand, dz, dz_shift) computing the step's lanes of grad_z into dz at at.i -
// dz_shift (and grad_residual's into dres at at.i, where dres is set), operand =
// operands(channels) the step's per-channel operands. scalar_t: the activations' type.
template <typename scalar_t, typename Body>
void with_apply_step(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                     const OptTensor& count, scalar_t* dres, Body body) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = geometry_of(in.out);
  const BackwardView<scalar_t> e(in);
  const bool batch_norm = in.gamma.defined(), recovering = batch_norm && !in.xhat;
  const int64_t C = batch_norm ? g.channels : 0;
  const ChannelTable<scalar_t> table(e, C);
  std::vector<acc_t> k(C), mean_g(C), mean_gx(C);  // field by field, as the table
  const auto [xhat_scale, xhat_shift] = xhat_coefficients<scalar_t>(in, C);
  if (batch_norm) {
    const acc_t n = count ? *count->const_data_ptr<acc_t>() : static_cast<acc_t>(g.count());
    const acc_t *sg = sum_g->const_data_ptr<acc_t>(), *sgx = sum_gx->const_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      math::bn_backward_coefficients(table.gamma[c], table.invstd[c], sg[c], sgx[c], n, k[c], mean_g[c],
                                     mean_gx[c]);
    }
  }
  const auto ch = table.pointers();
  const acc_t *kk = k.data(), *mg = mean_g.data(), *mgx = mean_gx.data();
  const acc_t *sc = xhat_scale.data(), *sh = xhat_shift.data();
  with_flags([&](auto bn, auto recover, auto has_res, auto write_dres) {
    if constexpr (bn || !(recover || has_res)) {  // (recover needs BN, a residual only matters then)
      const auto operands = [=](auto channels) {  // none without BN (its tables are empty)
        if constexpr (bn) {
          return std::pair{ch(channels), std::array{channels(kk), channels(mg), channels(mgx), channels(sc),
                                                    channels(sh)}};
        } else {
          return 0;
        }
      };
      body(operands, [=](auto at, const auto& operand, scalar_t* dz, int64_t dz_shift) VGGBENCH_STEP {
        prefetch_ahead(at, e.y, e.dy, recover && has_res ? e.res : nullptr, bn && !recover ? e.xhat : nullptr);
        const auto y = at.load(e.y), gi = e.g_of(y, at.load(e.dy));
        auto out = gi;
        if constexpr (bn) {
          const auto& [channel, coefficient] = operand;
          std::remove_const_t<decltype(y)> xhat;
          if constexpr (recover) {
            xhat = e.recovered_xhat_of(y, residual_of<has_res>(at, e.res), channel);
          } else {
            xhat = at.load(e.xhat) * coefficient[3] + coefficient[4];
          }
          out = math::bn_input_grad(gi, xhat, coefficient[0], coefficient[1], coefficient[2]);
        }
        decltype(at){at.i - dz_shift, at.count}.store(dz, out);
        if constexpr (write_dres) at.store(dres, gi);
      });
    }
  }, batch_norm, recovering, recovering && in.residual.has_value(), dres != nullptr);
}

void backward_apply(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                    const OptTensor& count, const Tensor& grad_z, const OptTensor& grad_residual) {
  RECORD_FUNCTION("vggbench::cpu::backward_apply", {});  // the pass, in profiles
  const Geometry g = geometry_of(in.out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dz = grad_z.mutable_data_ptr<scalar_t>();
    scalar_t* dres = grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr;
    with_apply_step<scalar_t>(in, sum_g, sum_gx, count, dres, [&](auto operands, auto step) {
      for_each_step<acc_t>(g, operands,
                           [=](auto at, const auto& operand) VGGBENCH_STEP { step(at, operand, dz, 0); });
    });
  });
}

// The entry conv's weight gradient (3 input channels, float32): weight_grad's and
// apply_weight_grad's kernel.
constexpr int64_t kEntryChannels = 3;
constexpr int64_t kEntryTaps = 9 * kEntryChannels;  // (dy, dx, c) of a 3x3 window
// Pixels per block of whole images (at least one image): apply_weight_grad writes a block's
// grad_z to a buffer and reduces it from there while in cache, in float; the blocks then add
// up in double, in order.
constexpr int64_t kEntryBlockPixels = 256;

// Whether x (N, 3, H, W) and weight make a conv the entry kernels take, x in any layout:
// x float32 or bfloat16 (of dtype `dtype`), not empty, 3x3 kernel, stride 1, padding 1.
bool entry_shape_applies(const Tensor& x, const Tensor& weight, at::ScalarType dtype, int64_t stride,
                         int64_t padding) {
  return (dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && x.dim() == 4 &&
         x.numel() > 0 && x.size(1) == kEntryChannels && weight.size(2) == 3 && weight.size(3) == 3 &&
         stride == 1 && padding == 1;
}

// Whether the entry kernel computes the weight gradient of conv2d(x, weight, stride,
// padding) with an output gradient of dtype `grad`: x and the gradient both float32 or both
// bfloat16, channels_last, 3 input channels, 3x3 kernel, stride 1, padding 1, not empty.
bool entry_kernel_applies(const Tensor& x, const Tensor& weight, at::ScalarType grad, int64_t stride,
                          int64_t padding) {
  return entry_shape_applies(x, weight, grad, stride, padding) && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Whether x is contiguous (NCHW) and not also channels_last.
bool nchw(const Tensor& x) { return x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast); }

// How the entry kernels walk x (N, 3, H, W), channels_last or contiguous: blocks of whole
// images, each copied zero-padded, (H + 2, W + 2, 3) per image, into a buffer of the thread.
struct EntryBlocks {
  int64_t N, H, W, pixels;          // pixels per image
  int64_t images, count;            // images per block; blocks
  int64_t row, image;               // floats per row and per image of the padded copy
  int64_t channel_step, pixel_step;  // x's strides (an image: 3 * pixels values in either layout)

  explicit EntryBlocks(const Tensor& x)
      : N(x.size(0)), H(x.size(2)), W(x.size(3)), pixels(H * W),
        images(std::max<int64_t>(1, kEntryBlockPixels / pixels)), count((N + images - 1) / images),
        row((W + 2) * kEntryChannels), image((H + 2) * row), channel_step(nchw(x) ? pixels : 1),
        pixel_step(nchw(x) ? 1 : kEntryChannels) {}

  int64_t first(int64_t block) const { return block * images; }
  int64_t images_in(int64_t block) const { return std::min(N, first(block) + images) - first(block); }
  // The offset of x[n, c, h, w].
  int64_t at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return n * pixels * kEntryChannels + c * channel_step + (h * W + w) * pixel_step;
  }
  // A thread's padded copy: zeros, whose border the copies leave as they are.
  std::vector<float> padded_buffer() const { return std::vector<float>(images * image, 0.0f); }
  // The block's images of x (float or bfloat16) into `padded`, as floats.
  template <typename T>
  void copy(const T* x, int64_t block, float* padded) const {
    for (int64_t n = 0; n < images_in(block); ++n) {
      for (int64_t h = 0; h < H; ++h) {
        float* padded_row = padded + n * image + (h + 1) * row + kEntryChannels;
        if (pixel_step == kEntryChannels) {  // channels_last: the row as it is
          std::copy_n(x + at(first(block) + n, 0, h, 0), W * kEntryChannels, padded_row);
          continue;
        }
        for (int64_t c = 0; c < kEntryChannels; ++c) {
          const T* plane_row = x + at(first(block) + n, c, h, 0);
          for (int64_t w = 0; w < W; ++w) padded_row[w * kEntryChannels + c] = plane_row[w];
        }
      }
    }
  }
};

// Full chunks of kWidth channels that the entry kernels' register tiles cover at once, so
// that each broadcast input value feeds that many FMAs (the loads, not the FMAs, bounded the
// one-chunk tiles): two with AVX-512. AVX2's 16 registers hold two chunks of the forward's
// tiles if they are of 4 outputs (the direct conv with its statistics then took 0.82x as
// long at 8x8, AMD EPYC Zen 3, N=100, 2 threads), but not of the weight gradient's 9 x 2
// accumulators (they spilled: 1.15x as long at 32x32, Zen 4 forced to AVX2).
constexpr int kEntryConvChunks = kRegisterBytes >= 32 ? 2 : 1;
constexpr int kEntryGradChunks = kRegisterBytes >= 64 ? 2 : 1;
// Outputs of a row per forward tile (each with kEntryConvChunks accumulators).
constexpr int kEntryTilePixels = kRegisterBytes == 32 ? 4 : 8;

// visit(channels, step, chunks) over K output channels, NHWC, as for_channel_chunks but in
// groups: Chunks full chunks of kWidth at a time while they fit, then one chunk at a time
// (the last may be partial). chunks: std::integral_constant<int, Q>, the group's chunks;
// chunk q's step at offset i of the group's first channel is step(i + q * kWidth).
template <int Chunks, typename Visit>
void for_entry_channel_groups(int64_t K, Visit visit) {
  int64_t grouped = 0;
  if constexpr (Chunks > 1) {
    grouped = K / (Chunks * kWidth) * (Chunks * kWidth);
    for (int64_t c0 = 0; c0 < grouped; c0 += Chunks * kWidth) {
      visit(ChannelLanes<kWidth, true>{c0, kWidth}, [](int64_t i) { return Step<float, kWidth, true>{i, kWidth}; },
            std::integral_constant<int, Chunks>{});
    }
  }
  for_channel_chunks<float>(K - grouped, [&](auto channels, auto step) {
    visit(decltype(channels){channels.c0 + grouped, channels.count}, step, std::integral_constant<int, 1>{});
  });
}

// The entry conv's forward tile: outputs w0 .. w0 + P - 1 of a row for Q chunks of output
// channels (`at` the first chunk's Step maker, taps its (tap, k) weights), each a chain of
// FMAs over the 27 taps in order (the same bits for any P and Q), from the padded row
// `window` (pixel w0).
template <int P, int Q, typename At>
VGGBENCH_STEP inline void entry_tile(const float* window, const int64_t (&offset)[kEntryTaps], const float* taps,
                                     int64_t K, At at, Lanes<float, kWidth> (&acc)[P][Q]) {
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) acc[p][q] = Lanes<float, kWidth>(0);
  for (int t = 0; t < kEntryTaps; ++t) {
    Lanes<float, kWidth> weights[Q];
    for (int q = 0; q < Q; ++q) weights[q] = at(t * K + q * kWidth).load(taps);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const auto input = broadcast_lanes<kWidth>(window + p * kEntryChannels + offset[t]);
      for (int q = 0; q < Q; ++q) acc[p][q] = multiply_add(input, weights[q], acc[p][q]);
    }
  }
}

// Images of at most this many pixels take entry_conv_stats; larger ones ATen's conv and
// batch_stats. AVX2 build: 256, the study's 8x8 and 16x16 maps (AMD EPYC Zen 3, N=100, 2
// threads, against ATen's conv in the same process: this kernel with its statistics 0.67x its
// time at 8x8, 1.04x at 16x16 and 1.25x at 32x32, where ATen's conv + a batch_stats pass took
// 0.82x, 1.2x and ~1.3x). AVX-512 build: up to 32x32 (Zen 4 with AVX-512, same process: the
// entry unit's fwd+bwd 0.88-0.94x with it at 16x16 and 32x32). The baseline build: 128.
#if defined(VGGBENCH_CPU_PASSES_AVX512)
constexpr int64_t kEntryDirectPixels = 32 * 32;
#elif defined(VGGBENCH_CPU_PASSES_AVX2)
constexpr int64_t kEntryDirectPixels = 16 * 16;
#else
constexpr int64_t kEntryDirectPixels = 128;
#endif
// Images of at most this many pixels take entry_conv_act (eval, and no BN): with AVX2 also
// 32x32, where, with no statistics to sum, the direct conv beats ATen's conv and a normalise
// pass (the float32 entry unit's eval forward, N=100, AMD EPYC Zen 3: 0.48-0.53x native eager's
// time, against 0.71x).
#if defined(VGGBENCH_CPU_PASSES_AVX2)
constexpr int64_t kEntryActPixels = 32 * 32;
#else
constexpr int64_t kEntryActPixels = kEntryDirectPixels;
#endif

// Images of at most this many pixels take the direct conv when x is contiguous (NCHW): its
// output, channels_last, is then copied to NCHW (cpu/transpose.h), which at 32x32 costs more
// than it saves (float32 entry unit's eval forward, N=100, AMD EPYC Zen 3: ATen's NCHW conv +
// normalise 2.9 ms; the direct conv 1.6 ms + the copy of its 13 MB output 1.6-2.2 ms).
constexpr int64_t kEntryNchwPixels = 16 * 16;

// Whether the entry kernels' direct conv computes conv(x, weight) (bias: whether it has one):
// x float32 (N, 3, H, W), channels_last with H * W <= max_pixels, or contiguous with H * W <=
// min(max_pixels, kEntryNchwPixels), a float32 3x3 weight, stride 1, padding 1, no bias.
bool entry_direct_applies(const Tensor& x, const Tensor& weight, bool bias, int64_t stride, int64_t padding,
                          int64_t max_pixels) {
  if (bias || weight.scalar_type() != at::kFloat || weight.size(1) != kEntryChannels ||
      !entry_shape_applies(x, weight, at::kFloat, stride, padding)) {
    return false;
  }
  if (nchw(x)) return x.size(2) * x.size(3) <= std::min(max_pixels, kEntryNchwPixels);
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.size(2) * x.size(3) <= max_pixels;
}

// The direct entry conv's outputs, handed over as they are computed: per block of images (in
// parallel) and group of output channels (for_entry_channel_groups), finish = make(block,
// at_c, chunks) maps each output chunk q's value to what is stored (finish(q, value)) and is
// told of each row's end (finish.row_done()). Per image row, kEntryTilePixels outputs at a
// time, their 27 taps' products summed with FMAs (entry_tile) from a zero-padded copy of the
// images. Returns the (N, K, H, W) channels_last output (see in_layout_of).
template <typename Make>
Tensor entry_direct_conv(const Tensor& x, const Tensor& weight, Make make) {
  const EntryBlocks blocks(x);
  const int64_t H = blocks.H, W = blocks.W, HW = blocks.pixels, K = weight.size(0);
  std::vector<float> taps(kEntryTaps * K);  // (dy, dx, c, k), read through the weight's strides
  const auto w = weight.accessor<float, 4>();
  int64_t offset[kEntryTaps];  // of each tap in the padded copy, from its output's pixel
  for (int64_t dy = 0; dy < 3; ++dy) {
    for (int64_t dx = 0; dx < 3; ++dx) {
      for (int64_t c = 0; c < kEntryChannels; ++c) {
        const int64_t t = (dy * 3 + dx) * kEntryChannels + c;
        offset[t] = dy * blocks.row + dx * kEntryChannels + c;
        for (int64_t k = 0; k < K; ++k) taps[t * K + k] = w[k][c][dy][dx];
      }
    }
  }
  const float* input = x.const_data_ptr<float>();
  Tensor z = at::empty({blocks.N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  float* out = z.mutable_data_ptr<float>();
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> padded = blocks.padded_buffer();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = blocks.first(b), count = blocks.images_in(b);
      blocks.copy(input, b, padded.data());
      for_entry_channel_groups<kEntryConvChunks>(K, [&](auto channels, auto at, auto chunks) {
        constexpr int Q = decltype(chunks)::value;
        const auto at_c = [&](int64_t i) { return at(i + channels.c0); };
        auto finish = make(b, at_c, chunks);
        for (int64_t n = 0; n < count; ++n) {
          for (int64_t h = 0; h < H; ++h) {
            const float* window = padded.data() + n * blocks.image + h * blocks.row;
            float* z_row = out + ((first + n) * HW + h * W) * K;
            const auto store = [&](int64_t w0, const auto& acc) {
              for (const auto& outputs : acc) {
                for (int q = 0; q < Q; ++q) at_c(w0 * K + q * kWidth).store(z_row, finish(q, outputs[q]));
                w0 += 1;
              }
            };
            int64_t w0 = 0;
            for (; w0 + kEntryTilePixels <= W; w0 += kEntryTilePixels) {
              Lanes<float, kWidth> acc[kEntryTilePixels][Q];
              entry_tile<kEntryTilePixels, Q>(window + w0 * kEntryChannels, offset, taps.data(), K, at_c, acc);
              store(w0, acc);
            }
            for (; w0 < W; ++w0) {
              Lanes<float, kWidth> acc[1][Q];
              entry_tile<1, Q>(window + w0 * kEntryChannels, offset, taps.data(), K, at_c, acc);
              store(w0, acc);
            }
            finish.row_done();
          }
        }
      });
    }
  });
  return z;
}

// The direct conv's output z (channels_last) in x's layout.
Tensor in_layout_of(const Tensor& x, const Tensor& z) { return nchw(x) ? cpu::contiguous_copy(z) : z; }

// entry_direct_conv's finish for the batch statistics: each output as it is, with its
// channel's sums of d = z - shift and of d^2 in float over a row, added in double to the
// block's (`sums`: K sums of d, then K of d^2).
template <int Q, typename At>
class EntrySums {
 public:
  EntrySums(At at_c, int64_t K, const float* shift, double* sums) : at_c_(at_c), K_(K), sums_(sums) {
    for (int q = 0; q < Q; ++q) centre_[q] = at_c_(q * kWidth).load(shift), sum_[q] = V(0), sum_sq_[q] = V(0);
  }
  VGGBENCH_STEP Lanes<float, kWidth> operator()(int q, Lanes<float, kWidth> z) {
    const V d = z - centre_[q];
    sum_[q] = sum_[q] + d, sum_sq_[q] = sum_sq_[q] + d * d;
    return z;
  }
  void row_done() {
    for (int q = 0; q < Q; ++q) {  // widened: the row's float sums into the block's
      for (int term = 0; term < 2; ++term) {
        const auto wide_at = at_c_(term * K_ + q * kWidth);
        const Step<double, kWidth, decltype(wide_at)::kFull> wide{wide_at.i, wide_at.count};
        wide.store(sums_, wide.load(sums_) + Lanes<double, kWidth>(term == 0 ? sum_[q] : sum_sq_[q]));
      }
      sum_[q] = V(0), sum_sq_[q] = V(0);
    }
  }

 private:
  using V = Lanes<float, kWidth>;
  At at_c_;
  int64_t K_;
  double* sums_;
  V centre_[Q], sum_[Q], sum_sq_[Q];
};

// Kernels::conv_stats of the passes: the entry conv on maps of at most kEntryDirectPixels as
// a direct conv (entry_direct_conv), with its output's ChannelSums (as the Winograd
// conv_stats: sums of z - shift and its square, shift = z at the first pixel; float within a
// row, double across rows and blocks, in order); nullopt for other convs.
std::optional<std::tuple<Tensor, Tensor, Tensor>> entry_conv_stats(const Tensor& x, const Tensor& weight,
                                                                    const OptTensor& bias, int64_t stride,
                                                                    int64_t padding) {
  if (!entry_direct_applies(x, weight, bias.has_value(), stride, padding, kEntryDirectPixels)) return std::nullopt;
  RECORD_FUNCTION("vggbench::conv", {});  // one scope, as the orchestration's conv
  const EntryBlocks blocks(x);
  const int64_t H = blocks.H, W = blocks.W, K = weight.size(0);
  const float* input = x.const_data_ptr<float>();
  const auto w = weight.accessor<float, 4>();
  std::vector<float> shift(K, 0.0f);  // z at the first pixel: taps outside the image are 0
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t dy = 1; dy < 3 && dy - 1 < H; ++dy) {
      for (int64_t dx = 1; dx < 3 && dx - 1 < W; ++dx) {
        for (int64_t c = 0; c < kEntryChannels; ++c) {
          shift[k] = std::fma(input[blocks.at(0, c, dy - 1, dx - 1)], w[k][c][dy][dx], shift[k]);
        }
      }
    }
  }
  std::vector<double> partial(blocks.count * 2 * K, 0.0);  // per block: sums of d, then of d^2
  Tensor z = entry_direct_conv(x, weight, [&](int64_t block, auto at_c, auto chunks) {
    return EntrySums<decltype(chunks)::value, decltype(at_c)>(at_c, K, shift.data(), partial.data() + block * 2 * K);
  });
  std::vector<double> total(2 * K, 0.0), centre(shift.begin(), shift.end());
  for (int64_t b = 0; b < blocks.count; ++b) {
    for (int64_t j = 0; j < 2 * K; ++j) total[j] += partial[b * 2 * K + j];
  }
  auto [mean, var] =
      stats_from_sums(total.data(), total.data() + K, centre.data(), blocks.N * blocks.pixels, std::nullopt, z);
  return std::tuple{in_layout_of(x, z), mean, var};
}

// Kernels::conv_act of the passes: normalize_act(conv(x, weight), affine, no residual, slope)
// with the entry conv on maps of at most kEntryActPixels (nullopt for other convs) as a
// direct conv whose outputs are normalised and activated in registers as normalize_act does
// (the same bits; no pass over z).
std::optional<Tensor> entry_conv_act(const Tensor& x, const Tensor& weight, int64_t stride, int64_t padding,
                                     const ChannelAffine& a, double slope) {
  if (!entry_direct_applies(x, weight, false, stride, padding, kEntryActPixels)) return std::nullopt;
  RECORD_FUNCTION("vggbench::conv", {});  // one scope, as the orchestration's conv
  const auto [scale, shift] = affine_coefficients<float>(a, weight.size(0));
  const bool affine = a.transforms();
  using V = Lanes<float, kWidth>;
  const V s(static_cast<float>(slope));
  return in_layout_of(x, entry_direct_conv(x, weight, [&](int64_t, auto at_c, auto chunks) {
    constexpr int Q = decltype(chunks)::value;
    struct {
      V scale[Q], shift[Q], slope;
      bool affine;
      VGGBENCH_STEP V operator()(int q, V z) const {
        return math::leaky_relu(affine ? z * scale[q] + shift[q] : z, slope);
      }
      void row_done() const {}
    } finish;
    for (int q = 0; q < Q; ++q) {
      finish.scale[q] = at_c(q * kWidth).load(scale.data()), finish.shift[q] = at_c(q * kWidth).load(shift.data());
    }
    finish.slope = s, finish.affine = affine;
    return finish;
  }));
}

// The weight gradient (K, 3, 3, 3), channels_last, float32, of the 3x3 stride-1 padding-1
// conv of x (N, 3, H, W), channels_last, of T (float or c10::BFloat16, widened to float),
// with an output gradient of K channels whose rows (pixels) of each block of images
// dz_of(first_image, images, buffer) gives: a pointer to them, K values of T per pixel,
// elsewhere or in `buffer` (a vector of the thread, which dz_of may resize). Per block, per
// group of output channels (for_entry_channel_groups) and kernel row dy: the 3 x 3 products
// x(h + dy - 1, w + dx - 1, c) dz(h, w, k) summed with FMAs over the block's pixels in order,
// x read from a zero-padded copy of the block's images; the blocks added in double, in
// order. Every AVX build sums the same products in the same order: the same bits, for any
// thread count.
template <typename T, typename DzOf>
Tensor entry_weight_grad(const Tensor& x, int64_t K, DzOf dz_of) {
  const EntryBlocks blocks(x);
  const int64_t H = blocks.H, W = blocks.W, HW = blocks.pixels;
  const T* input = x.const_data_ptr<T>();
  std::vector<float> partial(blocks.count * kEntryTaps * K);  // per block: (dy, dx, c, k)
  using V = Lanes<float, kWidth>;
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    const DzOf dz_of_block = dz_of;  // a local copy: its captures stay in registers
    std::vector<float> padded = blocks.padded_buffer();
    std::vector<T> buffer;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t count = blocks.images_in(b);
      blocks.copy(input, b, padded.data());
      const T* dz = dz_of_block(blocks.first(b), count, buffer);
      float* out = partial.data() + b * kEntryTaps * K;
      for_entry_channel_groups<kEntryGradChunks>(K, [&](auto channels, auto at, auto chunks) {
        constexpr int Q = decltype(chunks)::value;
        const auto at_c = [&](int64_t i) { return at(i + channels.c0); };
        for (int64_t dy = 0; dy < 3; ++dy) {
          V acc[3 * kEntryChannels][Q] = {};
          for (int64_t n = 0; n < count; ++n) {
            for (int64_t h = 0; h < H; ++h) {
              const float* window = padded.data() + n * blocks.image + (h + dy) * blocks.row;
              const T* grad = dz + (n * HW + h * W) * K;
              for (int64_t w = 0; w < W; ++w, window += kEntryChannels) {
                V v[Q];
                for (int q = 0; q < Q; ++q) v[q] = at_c(w * K + q * kWidth).load(grad);
#pragma GCC unroll 9
                for (int j = 0; j < 3 * kEntryChannels; ++j) {
                  const V input = broadcast_lanes<kWidth>(window + j);
                  for (int q = 0; q < Q; ++q) acc[j][q] = multiply_add(input, v[q], acc[j][q]);
                }
              }
            }
          }
          for (int j = 0; j < 3 * kEntryChannels; ++j) {
            for (int q = 0; q < Q; ++q) at_c((dy * 3 * kEntryChannels + j) * K + q * kWidth).store(out, acc[j][q]);
          }
        }
      });
    }
  });
  // (K, 3, 3, 3) channels_last: element (k, c, dy, dx) at k * 27 + (dy * 3 + dx) * 3 + c
  Tensor grad_w = at::empty({K, kEntryChannels, 3, 3},
                            x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  float* result = grad_w.mutable_data_ptr<float>();
  at::parallel_for(0, kEntryTaps * K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      double total = 0.0;
      for (int64_t b = 0; b < blocks.count; ++b) total += static_cast<double>(partial[b * kEntryTaps * K + e]);
      result[(e % K) * kEntryTaps + e / K] = static_cast<float>(total);
    }
  });
  return grad_w;
}

// fn(T{}) with T the entry kernel's activation type for x: float or c10::BFloat16.
template <typename F>
auto with_entry_type(const Tensor& x, F fn) {
  return x.scalar_type() == at::kBFloat16 ? fn(c10::BFloat16{}) : fn(float{});
}

// Kernels::weight_grad: the entry kernel reading grad_z.
std::optional<Tensor> weight_grad(const Tensor& grad_z, const Tensor& x, const Tensor& weight, int64_t stride,
                                  int64_t padding) {
  if (!entry_kernel_applies(x, weight, grad_z.scalar_type(), stride, padding) ||
      !grad_z.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return std::nullopt;
  }
  RECORD_FUNCTION("vggbench::cpu::weight_grad", {});  // the pass, in profiles
  const int64_t pixels = x.size(2) * x.size(3), K = grad_z.size(1);
  return with_entry_type(x, [&](auto type) {
    using T = decltype(type);
    const T* dz = grad_z.const_data_ptr<T>();
    return entry_weight_grad<T>(x, K, [=](int64_t first, int64_t, std::vector<T>&) { return dz + first * pixels * K; });
  });
}

// Kernels::apply_weight_grad: the entry kernel, each block's grad_z computed by
// backward_apply's step into its buffer (the same values backward_apply stores).
std::optional<Tensor> apply_weight_grad(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                                        const OptTensor& count, const Tensor& x, const Tensor& weight,
                                        int64_t stride, int64_t padding) {
  const Geometry g = geometry_of(in.out);
  if (!entry_kernel_applies(x, weight, in.out.scalar_type(), stride, padding) || g.inner != 1) return std::nullopt;
  RECORD_FUNCTION("vggbench::cpu::apply_weight_grad", {});  // the pass, in profiles
  const int64_t pixels = x.size(2) * x.size(3), K = g.channels;
  Tensor grad_w;
  with_entry_type(x, [&](auto type) {
    using T = decltype(type);
    with_apply_step<T>(in, sum_g, sum_gx, count, nullptr, [&](auto operands, auto step) {
      grad_w = entry_weight_grad<T>(x, K, [=](int64_t first, int64_t images, std::vector<T>& buffer) {
        const int64_t shift = first * pixels * K;
        buffer.resize(images * pixels * K);
        for (int64_t p = first * pixels; p < (first + images) * pixels; ++p) {
          for_channel_chunks<float>(K, [&](auto channels, auto at) {
            step(at(p * K + channels.c0), operands(channels), buffer.data(), shift);
          });
        }
        return static_cast<const T*>(buffer.data());
      });
    });
  });
  return grad_w;
}

void recover_xhat(const BackwardInputs& in, const Tensor& out) {
  RECORD_FUNCTION("vggbench::cpu::recover_xhat", {});  // the pass, in profiles
  const Geometry g = geometry_of(in.out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_recover_xhat", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardView<scalar_t> e(in);
    const ChannelTable<scalar_t> table(e, g.channels);
    scalar_t* xhat = out.mutable_data_ptr<scalar_t>();
    with_flags([&](auto has_res) {
      for_each_step<acc_t>(g, table.pointers(), [=](auto at, const auto& channel) VGGBENCH_STEP {
        at.store(xhat, e.recovered_xhat_of(at.load(e.y), residual_of<has_res>(at, e.res), channel));
      });
    }, in.residual.has_value());
  });
}

// The backend's kernels with these passes.
Kernels with_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward) {
  return {.conv = conv,
          .conv_backward = conv_backward,
          .batch_stats = &batch_stats,
          .conv_stats = &entry_conv_stats,
          .normalize_act = &normalize_act,
          .update_running_stats = &update_running_stats,
          .backward_reduce = &backward_reduce,
          .backward_apply = &backward_apply,
          .recover_xhat = &recover_xhat,
          .reads_xhat_affine = true,
          .apply_weight_grad = &apply_weight_grad,
          .weight_grad = &weight_grad,
          .conv_act = &entry_conv_act};
}

}  // namespace
}  // namespace vggbench

#if defined(VGGBENCH_CPU_PASSES_AVX2) || defined(VGGBENCH_CPU_PASSES_AVX512)
#pragma GCC pop_options
#endif

#undef VGGBENCH_STEP
