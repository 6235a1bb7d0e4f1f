// CPU passes of the fused unit (see ../fused_unit.h): float, double and bfloat16
// activations, sums accumulated in double. Reductions run over fixed blocks of rows,
// combined in block order, so results do not depend on the number of threads.
#include "../backward_view.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace vggbench {
namespace {

constexpr int64_t kBlockElements = 1 << 15;  // elements per reduction block (~L2-sized)

// Runs body(first_row, end_row, partial) over fixed blocks of outer rows in parallel;
// each block accumulates `width` doubles per channel into its own zeroed `partial`.
// Returns the totals, blocks combined in order: entry j by combine(j, total, partial).
template <typename Body, typename Combine>
std::vector<double> reduce_blocks(const Geometry& g, int width, Body body, Combine combine) {
  const int64_t row = std::max<int64_t>(1, g.channels * g.inner);
  const int64_t rows = std::max<int64_t>(1, kBlockElements / row);
  const int64_t blocks = (g.outer + rows - 1) / rows;
  const int64_t stride = width * g.channels;
  std::vector<double> partial(blocks * stride, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      body(b * rows, std::min(g.outer, (b + 1) * rows), partial.data() + b * stride);
    }
  });
  std::vector<double> total(partial.begin(), partial.begin() + stride);
  for (int64_t b = 1; b < blocks; ++b) {
    for (int64_t j = 0; j < stride; ++j) total[j] = combine(j, total[j], partial[b * stride + j]);
  }
  return total;
}

// Calls fn(offset, channel) for every element of outer rows [first, end), innermost over
// the contiguous dimension: H*W for NCHW, the channels for NHWC (so per-channel
// coefficients and accumulators are contiguous there and the loop vectorises).
template <typename F>
inline void for_each_element(const Geometry& g, int64_t first, int64_t end, F fn) {
  for (int64_t o = first; o < end; ++o) {
    if (g.inner == 1) {
      for (int64_t c = 0; c < g.channels; ++c) fn(o * g.channels + c, c);
      continue;
    }
    for (int64_t c = 0; c < g.channels; ++c) {
      const int64_t base = (o * g.channels + c) * g.inner;
      for (int64_t i = base; i < base + g.inner; ++i) fn(i, c);
    }
  }
}

// Runs body(first_row, end_row) over the outer rows in parallel (elementwise passes).
template <typename Body>
void parallel_rows(const Geometry& g, Body body) {
  const int64_t grain = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, g.channels * g.inner));
  at::parallel_for(0, g.outer, grain, body);
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

std::tuple<Tensor, Tensor> channel_stats(const Tensor& z) {
  const Geometry g = geometry_of(z);
  const int64_t C = g.channels;
  std::vector<double> mean(C), var(C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_channel_stats", [&] {
    const scalar_t* data = z.const_data_ptr<scalar_t>();
    std::vector<double> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(data[c * g.inner]);
    const auto sums = reduce_blocks(
        g, 2,
        [&](int64_t first, int64_t end, double* partial) {
          double* sumsq = partial + C;
          for_each_element(g, first, end, [&](int64_t i, int64_t c) {
            const double d = static_cast<double>(data[i]) - shift[c];
            partial[c] += d, sumsq[c] += d * d;
          });
        },
        [](int64_t, double a, double b) { return a + b; });
    for (int64_t c = 0; c < C; ++c) {
      math::mean_var(sums[c], sums[C + c], shift[c], static_cast<double>(g.count()), mean[c],
                     var[c]);
    }
  });
  return {channel_tensor(mean, 0, C, z), channel_tensor(var, 0, C, z)};
}

void normalize_act(const Tensor& z, const OptTensor& scale, const OptTensor& shift,
                   const OptTensor& residual, double slope, const Tensor& out) {
  const Geometry g = geometry_of(z);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "vggbench_normalize_act", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    const scalar_t* in = z.const_data_ptr<scalar_t>();
    const scalar_t* res = data_or_null<scalar_t>(residual);
    const stat_t* sc = data_or_null<stat_t>(scale);
    const stat_t* sh = data_or_null<stat_t>(shift);
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<stat_t>(slope);
    parallel_rows(g, [&](int64_t first, int64_t end) {
      for_each_element(g, first, end, [&](int64_t i, int64_t c) {
        stat_t v = static_cast<stat_t>(in[i]) * (sc ? sc[c] : stat_t(1)) + (sh ? sh[c] : stat_t(0));
        if (res) v += static_cast<stat_t>(res[i]);
        y[i] = static_cast<scalar_t>(math::leaky_relu(v, s));
      });
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> backward_reduce(const BackwardInputs& in) {
  const Geometry g = geometry_of(in.out);
  const int64_t C = g.channels;
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_backward_reduce", [&] {
    const BackwardView<scalar_t> v(in);
    const bool recovering = !v.xhat;
    const auto body = [&](int64_t first, int64_t end, double* partial) {
      double *sum_gx = partial + C, *peak = partial + 2 * C;
      for_each_element(g, first, end, [&](int64_t i, int64_t c) {
        const double gi = v.g(i);
        partial[c] += gi, sum_gx[c] += gi * static_cast<double>(v.x_hat(i, c));
        if (recovering) peak[c] = std::max(peak[c], static_cast<double>(std::abs(v.pre(i))));
      });
    };
    // Entries [0, 2C) are sums, [2C, 3C) maxima.
    sums = reduce_blocks(g, 3, body, [C](int64_t j, double a, double b) {
      return j < 2 * C ? a + b : std::max(a, b);
    });
  });
  return {channel_tensor(sums, 0, C, in.out), channel_tensor(sums, C, C, in.out),
          channel_tensor(sums, 2 * C, C, in.out)};
}

void backward_apply(const BackwardInputs& in, const OptTensor& k, const OptTensor& mean_g,
                    const OptTensor& mean_gx, const Tensor& grad_z,
                    const OptTensor& grad_residual) {
  const Geometry g = geometry_of(in.out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.out.scalar_type(), "vggbench_backward_apply", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    const BackwardView<scalar_t> v(in);
    const stat_t* kk = data_or_null<stat_t>(k);
    const stat_t* mg = data_or_null<stat_t>(mean_g);
    const stat_t* mgx = data_or_null<stat_t>(mean_gx);
    scalar_t* dz = grad_z.mutable_data_ptr<scalar_t>();
    scalar_t* dres = grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr;
    parallel_rows(g, [&](int64_t first, int64_t end) {
      for_each_element(g, first, end, [&](int64_t i, int64_t c) {
        const stat_t gi = v.g(i);
        dz[i] = static_cast<scalar_t>(
            kk ? math::bn_input_grad(gi, v.x_hat(i, c), kk[c], mg[c], mgx[c]) : gi);
        if (dres) dres[i] = static_cast<scalar_t>(gi);
      });
    });
  });
}

const Kernels kCpuKernels{&channel_stats, &normalize_act, &backward_reduce, &backward_apply};

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CPU, m) { vggbench::register_backend(m, vggbench::kCpuKernels); }
