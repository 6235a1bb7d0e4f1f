// The CPU passes over activations of the fused unit (see ../fused_unit.h): float, double
// and bfloat16 activations. Compiled three times, into each file's own anonymous namespace:
// for the baseline x86-64 ISA (fused_unit_kernel.cpp), for AVX2 (fused_unit_kernel_avx2.cpp)
// and for AVX-512 F/BW/VL (fused_unit_kernel_avx512.cpp); fused_unit_kernel.cpp uses the
// widest the CPU has (capped by VGGBENCH_CPU_ISA, as the Winograd kernels). No build may
// contract into FMAs (fp-contract off: the baseline and AVX2 have none), so all give the
// same bits.
//
// Reductions run over fixed blocks of rows, combined in block order, so results do not
// depend on the number of threads. Within a block, values are summed in the compute type
// (float for float/bfloat16) over spans of a few values per channel, and the spans in
// double: vectorisable loops, and float rounding over at most kSpan / kLanes = kRows terms
// in a row (NCHW: kLanes partial sums over kSpan values; NHWC: kRows rows).
// Per-element options (residual, recovery of xhat, ...) are template parameters, so every
// inner loop is branch-free and the compiler vectorises it.
#pragma once

#include "../affine_view.h"
#include "../backward_view.h"

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
#ifdef VGGBENCH_CPU_PASSES_AVX512
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl")
#endif

namespace vggbench {
namespace {


constexpr int64_t kBlockElements = 1 << 15;  // elements per reduction block (~L2-sized)
constexpr int64_t kSpan = 256;               // values per channel summed before widening
constexpr int kLanes = 8;                    // independent partial sums along a contiguous run
constexpr int64_t kRows = kSpan / kLanes;    // NHWC rows summed per channel before widening

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

// Per-channel reductions of W values per element: entries [0, Sums) are summed, the
// rest are maxima. value(i, c) returns the W values of the element at offset i, channel c.
// Returns W*C doubles (entry w*C + c), blocks of rows combined in order.
template <typename acc_t, int W, int Sums, typename Value>
std::vector<double> reduce_channels(const Geometry& g, Value value) {
  const int64_t C = g.channels;
  const auto combine = [](int w, auto a, auto b) { return w < Sums ? a + b : std::max(a, b); };
  const int64_t rows = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, C * g.inner));
  const int64_t blocks = (g.outer + rows - 1) / rows;
  std::vector<double> partial(blocks * W * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const Value value_of = value;  // a local copy: its captures stay in registers
    std::vector<acc_t> acc(W * C);
    for (int64_t b = begin; b < end; ++b) {
      double* out = partial.data() + b * W * C;
      const int64_t first = b * rows, last = std::min(g.outer, first + rows);
      if (g.inner == 1) {  // NHWC: channels contiguous, accumulate across rows
        for (int64_t o = first; o < last; o += kRows) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t r = o; r < std::min(last, o + kRows); ++r) {
#pragma GCC ivdep
            for (int64_t c = 0; c < C; ++c) {
              const std::array<acc_t, W> v = value_of(r * C + c, c);
              for (int w = 0; w < W; ++w) acc[w * C + c] = combine(w, acc[w * C + c], v[w]);
            }
          }
          for (int w = 0; w < W; ++w) {  // no j / C: a division per entry would cost more than the sums
            for (int64_t c = 0; c < C; ++c) out[w * C + c] = combine(w, out[w * C + c], double(acc[w * C + c]));
          }
        }
        continue;
      }
      for (int64_t o = first; o < last; ++o) {  // NCHW: a contiguous run per channel
        for (int64_t c = 0; c < C; ++c) {
          const int64_t base = (o * C + c) * g.inner;
          for (int64_t s = 0; s < g.inner; s += kSpan) {
            const int64_t n = std::min(kSpan, g.inner - s);
            std::array<std::array<acc_t, kLanes>, W> lanes{};
            int64_t i = 0;
            for (; i + kLanes <= n; i += kLanes) {
#pragma GCC ivdep
              for (int l = 0; l < kLanes; ++l) {
                const std::array<acc_t, W> v = value_of(base + s + i + l, c);
                for (int w = 0; w < W; ++w) lanes[w][l] = combine(w, lanes[w][l], v[w]);
              }
            }
            for (; i < n; ++i) {
              const std::array<acc_t, W> v = value_of(base + s + i, c);
              for (int w = 0; w < W; ++w) lanes[w][0] = combine(w, lanes[w][0], v[w]);
            }
            for (int w = 0; w < W; ++w) {
              for (int l = 0; l < kLanes; ++l) out[w * C + c] = combine(w, out[w * C + c], double(lanes[w][l]));
            }
          }
        }
      }
    }
  });
  std::vector<double> total(W * C, 0.0);  // an empty batch: sums 0 (and maxima 0)
  for (int64_t b = 0; b < blocks; ++b) {
    for (int w = 0; w < W; ++w) {
      for (int64_t c = 0; c < C; ++c) total[w * C + c] = combine(w, total[w * C + c], partial[(b * W + w) * C + c]);
    }
  }
  return total;
}

// Calls fn(i, c) for every element, in parallel over rows, innermost over the contiguous
// dimension (H*W for NCHW, the channels for NHWC).
template <typename F>
void for_each_element(const Geometry& g, F fn) {
  const int64_t grain = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, g.channels * g.inner));
  at::parallel_for(0, g.outer, grain, [&](int64_t first, int64_t end) {
    const F fn_copy = fn;  // a local copy: its captures stay in registers, not re-read after stores
    for (int64_t o = first; o < end; ++o) {
      if (g.inner == 1) {
#pragma GCC ivdep
        for (int64_t c = 0; c < g.channels; ++c) fn_copy(o * g.channels + c, c);
        continue;
      }
      for (int64_t c = 0; c < g.channels; ++c) {
        const int64_t base = (o * g.channels + c) * g.inner;
#pragma GCC ivdep
        for (int64_t i = base; i < base + g.inner; ++i) fn_copy(i, c);
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

std::tuple<Tensor, Tensor> batch_stats(const Tensor& z, const OptTensor& bias) {
  RECORD_FUNCTION("vggbench::cpu::batch_stats", {});  // the pass, in profiles
  const Geometry g = geometry_of(z);
  const int64_t C = g.channels;
  std::vector<double> mean(C, 0.0), var(C, 0.0);  // an empty batch: 0 and 0
  if (g.count() > 0) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = z.const_data_ptr<scalar_t>();
    // sums of z - shift, shift = one sample of the channel: no cancellation when |mean| >> std
    std::vector<acc_t> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(data[c * g.inner]);
    const acc_t* sh = shift.data();
    const auto sums = reduce_channels<acc_t, 2, 2>(g, [=](int64_t i, int64_t c) {
      const acc_t d = static_cast<acc_t>(data[i]) - sh[c];
      return std::array<acc_t, 2>{d, d * d};
    });
    const scalar_t* b = data_or_null<scalar_t>(bias);
    for (int64_t c = 0; c < C; ++c) {
      math::mean_var(sums[c], sums[C + c], static_cast<double>(shift[c]),
                     static_cast<double>(g.count()), mean[c], var[c]);
      if (b) mean[c] += static_cast<double>(b[c]);
    }
  });
  return {channel_tensor(mean, 0, C, z), channel_tensor(var, 0, C, z)};
}

void normalize_act(const Tensor& z, const ChannelAffine& a, const OptTensor& residual, double slope,
                   const Tensor& out) {
  RECORD_FUNCTION("vggbench::cpu::normalize_act", {});  // the pass, in profiles
  const Geometry g = geometry_of(z);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = g.channels;
    const AffineOperands<scalar_t> operands(a);
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto k = operands.of(c);
      scale[c] = k.scale, shift[c] = k.shift;
    }
    const scalar_t* in = z.const_data_ptr<scalar_t>();
    const scalar_t* res = data_or_null<scalar_t>(residual);
    const acc_t *sc = scale.data(), *sh = shift.data();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(slope);
    with_flags([&](auto affine, auto add_residual) {
      for_each_element(g, [=](int64_t i, int64_t c) {
        acc_t v = static_cast<acc_t>(in[i]);
        if constexpr (affine) v = v * sc[c] + sh[c];
        if constexpr (add_residual) v += static_cast<acc_t>(res[i]);
        y[i] = static_cast<scalar_t>(math::leaky_relu(v, s));
      });
    }, a.normalize || operands.bias != nullptr, res != nullptr);
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

// BackwardView::Channel of every channel, stored field by field: the inner loops load each
// field of consecutive channels (NHWC) with one vector load, where an array of structs would
// need gathers.
template <typename scalar_t>
struct ChannelTable {
  using View = BackwardView<scalar_t>;
  using Channel = typename View::Channel;
  using acc_t = typename View::acc_t;
  using rec_t = typename View::rec_t;
  std::vector<rec_t> recover_scale, recover_shift;
  std::vector<acc_t> gamma, beta, invstd, centre;

  ChannelTable(const View& view, int64_t channels)
      : recover_scale(channels), recover_shift(channels), gamma(channels), beta(channels),
        invstd(channels), centre(channels) {
    for (int64_t c = 0; c < channels; ++c) {
      const Channel ch = view.channel(c);
      recover_scale[c] = ch.recover_scale, recover_shift[c] = ch.recover_shift;
      gamma[c] = ch.gamma, beta[c] = ch.beta, invstd[c] = ch.invstd, centre[c] = ch.centre;
    }
  }

  // The fields' data, copied into lambdas that run the inner loops.
  struct Pointers {
    const rec_t *recover_scale, *recover_shift;
    const acc_t *gamma, *beta, *invstd, *centre;
    Channel operator[](int64_t c) const {
      return {recover_scale[c], recover_shift[c], gamma[c], beta[c], invstd[c], centre[c]};
    }
  };
  Pointers pointers() const {
    return {recover_scale.data(), recover_shift.data(), gamma.data(), beta.data(), invstd.data(),
            centre.data()};
  }
};

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
      sums = reduce_channels<acc_t, 2, 2>(g, [=](int64_t i, int64_t c) {
        const acc_t gi = e.g(i);
        return std::array<acc_t, 2>{gi, gi * static_cast<acc_t>(e.xhat[i])};
      });
      return;
    }
    const ChannelTable<scalar_t> table(e, C);
    const auto ch = table.pointers();
    with_flags([&](auto has_res) {  // the recovery rule's terms, sum(g) and sum(g * xhat) first
      sums = reduce_channels<acc_t, kTerms, kTerms>(g, [=](int64_t i, int64_t c) {
        acc_t t[kTerms];
        e.template recovery_terms<has_res>(i, ch[c], t);
        std::array<acc_t, kTerms> v;
        for (int w = 0; w < kTerms; ++w) v[w] = t[w];
        return v;
      });
    }, in.residual.has_value());
    for (int64_t c = 0; c < C; ++c) {
      acc_t channel[kTerms];
      for (int w = 0; w < kTerms; ++w) channel[w] = static_cast<acc_t>(sums[w * C + c]);
      flags[c] = e.recompute_flag(channel, static_cast<acc_t>(g.count()), ch[c]);
    }
  });
  return {channel_tensor(sums, 0, C, in.out), channel_tensor(sums, C, C, in.out),
          channel_tensor(flags, 0, C, in.out)};
}

void backward_apply(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                    const OptTensor& count, const Tensor& grad_z, const OptTensor& grad_residual) {
  RECORD_FUNCTION("vggbench::cpu::backward_apply", {});  // the pass, in profiles
  const Geometry g = geometry_of(in.out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardView<scalar_t> e(in);
    const bool batch_norm = in.gamma.defined(), recovering = batch_norm && !in.xhat;
    const int64_t C = batch_norm ? g.channels : 0;
    const ChannelTable<scalar_t> table(e, C);
    std::vector<acc_t> k(C), mean_g(C), mean_gx(C);  // field by field, as the table
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
    scalar_t* dz = grad_z.mutable_data_ptr<scalar_t>();
    scalar_t* dres = grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr;
    with_flags([&](auto has_res, auto recover, auto write_dres) {
      for_each_element(g, [=](int64_t i, int64_t c) {
        const acc_t gi = e.g(i);
        acc_t out = gi;
        if constexpr (recover) {
          out = math::bn_input_grad(gi, e.template recovered_xhat<has_res>(i, ch[c]), kk[c], mg[c], mgx[c]);
        } else if (batch_norm) {
          out = math::bn_input_grad(gi, static_cast<acc_t>(e.xhat[i]), kk[c], mg[c], mgx[c]);
        }
        dz[i] = static_cast<scalar_t>(out);
        if constexpr (write_dres) dres[i] = static_cast<scalar_t>(gi);
      });
    }, in.residual.has_value(), recovering, dres != nullptr);
  });
}

void recover_xhat(const BackwardInputs& in, const Tensor& out) {
  RECORD_FUNCTION("vggbench::cpu::recover_xhat", {});  // the pass, in profiles
  const Geometry g = geometry_of(in.out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_recover_xhat", [&] {
    const BackwardView<scalar_t> e(in);
    const ChannelTable<scalar_t> table(e, g.channels);
    const auto ch = table.pointers();
    scalar_t* xhat = out.mutable_data_ptr<scalar_t>();
    with_flags([&](auto has_res) {
      for_each_element(g, [=](int64_t i, int64_t c) {
        xhat[i] = static_cast<scalar_t>(e.template recovered_xhat<has_res>(i, ch[c]));
      });
    }, in.residual.has_value());
  });
}

// The backend's kernels with these passes.
Kernels with_passes(decltype(Kernels::conv) conv, decltype(Kernels::conv_backward) conv_backward) {
  return {.conv = conv,
          .conv_backward = conv_backward,
          .batch_stats = &batch_stats,
          .normalize_act = &normalize_act,
          .update_running_stats = &update_running_stats,
          .backward_reduce = &backward_reduce,
          .backward_apply = &backward_apply,
          .recover_xhat = &recover_xhat};
}

}  // namespace
}  // namespace vggbench

#if defined(VGGBENCH_CPU_PASSES_AVX2) || defined(VGGBENCH_CPU_PASSES_AVX512)
#pragma GCC pop_options
#endif
