// CUDA passes of the fused unit (the Kernels of ../fused_unit.h): float, double, half and
// bfloat16 activations, statistics and sums in the op-math type (float, or double for
// double). The per-channel maths is fused_unit_math.h's, as on the CPU.
//
// Launches per member: batch_stats and backward_reduce 2 (partial sums, then a finish of one
// thread per channel); normalize_act, update_running_stats and backward_apply 1. Nothing
// else is dispatched (allocations aside) and nothing is read on the host: everything runs
// on the current stream of the tensors' device.
//
// Reductions are deterministic: block (c, p) sums a fixed slice of channel c into
// partials[w][c][p] (w: which sum), and the finish adds the parts in order, so results
// depend only on the shape (no atomics).
//
// With inner == 1 (NHWC) a reduction block's loads are strided by C; the blocks of one
// slice run side by side (c is the fastest grid index), so neighbouring channels share
// those cache lines in L2.
#include "../backward_view.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <type_traits>

// The activation dtypes every pass takes.
#define VGGBENCH_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace vggbench {
namespace {

constexpr int kThreads = 256;                       // threads per block, every kernel
constexpr int kMaxParts = 128;                      // blocks per channel in a reduction
constexpr int64_t kMinPartElements = 4 * kThreads;  // so each thread loads a few values
constexpr int64_t kMaxBlocks = 4096;                // elementwise grid; grid-stride beyond

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One thread per channel.
unsigned channel_blocks(int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, kThreads));
}

// ---- Reductions: block (c, p) -> partials[w][c][p] -> one thread per channel ---------

// How a reduction splits each channel's `count` elements (j = o * inner + i, at offset
// (o * channels + c) * inner + i): block (c, p) takes [p * chunk, min((p + 1) * chunk, count)).
struct Split {
  int64_t channels, inner, count, chunk;
  int parts;
};

Split split_of(const Geometry& g) {
  const int64_t count = g.count();
  const int parts =
      static_cast<int>(std::clamp<int64_t>(ceil_div(count, kMinPartElements), 1, kMaxParts));
  return {g.channels, g.inner, count, ceil_div(count, parts), parts};
}

dim3 reduction_grid(const Split& s) { return dim3(static_cast<unsigned>(s.channels), s.parts); }

// Calls body(offset) for this thread's elements of block (c, p)'s slice, thread t taking
// j = begin + t, begin + t + kThreads, ...; (o, i) follow j without a division per step.
template <typename Body>
__device__ void for_each_in_slice(const Split& s, int64_t c, int64_t p, Body body) {
  const int64_t end = (p + 1) * s.chunk < s.count ? (p + 1) * s.chunk : s.count;
  int64_t j = p * s.chunk + threadIdx.x;
  if (j >= end) return;
  int64_t o = j / s.inner, i = j - o * s.inner;
  const int64_t step_o = kThreads / s.inner, step_i = kThreads % s.inner;
  for (; j < end; j += kThreads) {
    body((o * s.channels + c) * s.inner + i);
    i += step_i, o += step_o;
    if (i >= s.inner) i -= s.inner, ++o;
  }
}

// Tree-sums each thread's W values over the block in shared memory; thread 0 stores the
// results at partials[(w * channels + c) * parts + p] for block (c, p).
template <int W, typename acc_t>
__device__ void store_block_partials(const acc_t (&v)[W], const Split& s, acc_t* partials) {
  __shared__ acc_t smem[W][kThreads];
  for (int w = 0; w < W; ++w) smem[w][threadIdx.x] = v[w];
  __syncthreads();
  for (int n = kThreads / 2; n > 0; n /= 2) {
    if (threadIdx.x < n) {
      for (int w = 0; w < W; ++w) smem[w][threadIdx.x] += smem[w][threadIdx.x + n];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int w = 0; w < W; ++w) {
      partials[(w * s.channels + blockIdx.x) * s.parts + blockIdx.y] = smem[w][0];
    }
  }
}

// Channel c's W totals: its parts added in order.
template <int W, typename acc_t>
__device__ void sum_parts(const acc_t* partials, const Split& s, int64_t c, acc_t (&total)[W]) {
  for (int w = 0; w < W; ++w) {
    const acc_t* part = partials + (w * s.channels + c) * s.parts;
    total[w] = part[0];
    for (int p = 1; p < s.parts; ++p) total[w] += part[p];
  }
}

// ---- batch_stats ------------------------------------------------------------------------

// Sums of (z - shift) and (z - shift)^2 over a slice; shift = z at (0, c, 0), one sample of
// the channel (math::mean_var: no cancellation when |mean| >> std).
template <typename scalar_t, typename acc_t>
__global__ void stats_partials(const scalar_t* z, Split s, acc_t* partials) {
  const int64_t c = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(z[c * s.inner]);
  acc_t v[2] = {acc_t(0), acc_t(0)};
  for_each_in_slice(s, c, blockIdx.y, [&](int64_t k) {
    const acc_t d = static_cast<acc_t>(z[k]) - shift;
    v[0] += d, v[1] += d * d;
  });
  store_block_partials(v, s, partials);
}

// Mean and variance of z + bias: the bias moves the mean only.
template <typename scalar_t, typename acc_t>
__global__ void stats_finish(const scalar_t* z, const scalar_t* bias, const acc_t* partials,
                             Split s, acc_t* mean, acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= s.channels) return;
  acc_t total[2];
  sum_parts(partials, s, c, total);
  math::mean_var(total[0], total[1], static_cast<acc_t>(z[c * s.inner]),
                 static_cast<acc_t>(s.count), mean[c], var[c]);
  if (bias) mean[c] += static_cast<acc_t>(bias[c]);
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& z, const OptTensor& bias) {
  const c10::cuda::CUDAGuard guard(z.device());
  const Geometry g = geometry_of(z);
  const auto options = z.options().dtype(stats_dtype(z.scalar_type()));
  if (z.numel() == 0) return {at::zeros({g.channels}, options), at::zeros({g.channels}, options)};
  Tensor mean = at::empty({g.channels}, options), var = at::empty({g.channels}, options);
  const Split s = split_of(g);
  const Tensor partials = at::empty({2, g.channels, s.parts}, options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_partials<<<reduction_grid(s), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), s, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finish<<<channel_blocks(g.channels), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(bias), partials.const_data_ptr<acc_t>(),
        s, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// ---- backward_reduce ----------------------------------------------------------------------

constexpr int kTerms = math::kRecoveryTerms;

// The recovery rule's terms (fused_unit_math.h) over a slice, xhat recovered; with xhat
// given, only terms 0 and 1 (sum g, sum g * xhat): no rule, and terms 2.. stay 0.
template <typename scalar_t, typename acc_t>
__global__ void backward_partials(BackwardView<scalar_t> v, Split s, acc_t* partials) {
  const int64_t c = blockIdx.x;
  acc_t t[kTerms] = {};
  if (v.xhat) {
    for_each_in_slice(s, c, blockIdx.y, [&](int64_t i) {
      const acc_t g = v.g(i);
      t[0] += g, t[1] += g * static_cast<acc_t>(v.xhat[i]);
    });
  } else {
    const auto ch = v.channel(c);  // the block's channel: once per thread
    const auto sum_terms = [&](auto has_residual) {
      for_each_in_slice(s, c, blockIdx.y, [&](int64_t i) {
        acc_t e[kTerms];
        v.template recovery_terms<decltype(has_residual)::value>(i, ch, e);
        for (int w = 0; w < kTerms; ++w) t[w] += e[w];
      });
    };
    if (v.res) {
      sum_terms(std::true_type{});
    } else {
      sum_terms(std::false_type{});
    }
  }
  store_block_partials(t, s, partials);
}

// One thread per channel: its sums, and the rule's verdict (0 when xhat is given).
template <typename scalar_t, typename acc_t>
__global__ void backward_finish(BackwardView<scalar_t> v, const acc_t* partials, Split s,
                                acc_t* sum_g, acc_t* sum_gx, acc_t* recompute) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= s.channels) return;
  acc_t total[kTerms];
  sum_parts(partials, s, c, total);
  sum_g[c] = total[0], sum_gx[c] = total[1];
  recompute[c] =
      v.xhat ? acc_t(0) : v.recompute_flag(total, static_cast<acc_t>(s.count), v.channel(c));
}

std::tuple<Tensor, Tensor, Tensor> backward_reduce(const BackwardInputs& in) {
  // recovering xhat needs training-mode BN's operands
  TORCH_INTERNAL_ASSERT(in.xhat || in.gamma.defined(), "backward_reduce: no xhat and no BN");
  const c10::cuda::CUDAGuard guard(in.out.device());
  const Geometry g = geometry_of(in.out);
  const auto options = in.out.options().dtype(stats_dtype(in.out.scalar_type()));
  if (in.out.numel() == 0) {
    return {at::zeros({g.channels}, options), at::zeros({g.channels}, options),
            at::zeros({g.channels}, options)};
  }
  Tensor sum_g = at::empty({g.channels}, options), sum_gx = at::empty({g.channels}, options),
         recompute = at::empty({g.channels}, options);
  const Split s = split_of(g);
  const Tensor partials = at::empty({kTerms, g.channels, s.parts}, options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(in.out.scalar_type(), "vggbench_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardView<scalar_t> view(in);
    backward_partials<<<reduction_grid(s), kThreads, 0, stream>>>(
        view, s, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_finish<<<channel_blocks(g.channels), kThreads, 0, stream>>>(
        view, partials.const_data_ptr<acc_t>(), s, sum_g.mutable_data_ptr<acc_t>(),
        sum_gx.mutable_data_ptr<acc_t>(), recompute.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gx, recompute};
}

// ---- Elementwise passes ----------------------------------------------------------------

// Grid of the elementwise passes, grid-stride beyond kMaxBlocks. A flat index's channel
// repeats with period C * inner; where it fits, the stride is a multiple of that period,
// so a thread stays on one channel and computes its per-channel coefficients once.
unsigned elementwise_blocks(const Geometry& g) {
  const int64_t blocks = ceil_div(g.outer * g.channels * g.inner, kThreads);
  if (blocks <= kMaxBlocks) return static_cast<unsigned>(blocks);  // an element per thread
  const int64_t period = g.channels * g.inner;
  // the fewest blocks whose threads span whole periods
  const int64_t unit = period / std::gcd(period, int64_t{kThreads});
  return static_cast<unsigned>(unit <= kMaxBlocks ? kMaxBlocks / unit * unit : kMaxBlocks);
}

// The channel (idx / inner) % channels of a grid-stride index, kept up to date as idx
// advances by `stride`: two divisions per thread rather than per element.
struct ChannelCursor {
  int64_t inner, channels, i, c, step_i, step_c;

  __device__ ChannelCursor(int64_t idx, int64_t stride, int64_t inner, int64_t channels)
      : inner(inner), channels(channels), i(idx % inner), c((idx / inner) % channels),
        step_i(stride % inner), step_c((stride / inner) % channels) {}

  __device__ void advance() {
    i += step_i;
    const int64_t carry = i >= inner;
    if (carry) i -= inner;
    c += step_c + carry;
    if (c >= channels) c -= channels;
  }
};

// Grid-stride loop over a (outer, channels, inner) tensor: body(idx, coefficients) for every
// flat index, with coefficients = per_channel(c) recomputed only when the thread's channel
// changes.
template <typename PerChannel, typename Body>
__device__ void for_each_element(int64_t numel, int64_t channels, int64_t inner,
                                 PerChannel per_channel, Body body) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= numel) return;
  ChannelCursor cur(idx, stride, inner, channels);
  int64_t channel = cur.c;
  auto coefficients = per_channel(channel);
  for (; idx < numel; idx += stride, cur.advance()) {
    if (cur.c != channel) channel = cur.c, coefficients = per_channel(channel);
    body(idx, coefficients);
  }
}

// ---- normalize_act ------------------------------------------------------------------------

// ChannelAffine as a kernel sees it: absent operands are null (gamma 1, beta 0, bias 0).
template <typename scalar_t>
struct AffineOperands {
  using acc_t = at::opmath_type<scalar_t>;
  bool normalize;
  const acc_t *gamma, *beta, *mean, *var;
  const scalar_t* bias;  // the conv's, in the activation dtype
  acc_t eps;

  struct Coefficients {
    acc_t scale, shift;
  };

  explicit AffineOperands(const ChannelAffine& a)
      : normalize(a.normalize),
        gamma(data_or_null<acc_t>(a.gamma)),
        beta(data_or_null<acc_t>(a.beta)),
        mean(data_or_null<acc_t>(a.mean)),
        var(data_or_null<acc_t>(a.var)),
        bias(data_or_null<scalar_t>(a.bias)),
        eps(static_cast<acc_t>(a.eps)) {
    TORCH_INTERNAL_ASSERT(!normalize || (mean && var), "normalize_act: BN without statistics");
  }

  __device__ Coefficients of(int64_t c) const {
    Coefficients k;
    math::channel_affine(normalize, gamma ? gamma[c] : acc_t(1), beta ? beta[c] : acc_t(0),
                         normalize ? mean[c] : acc_t(0), normalize ? var[c] : acc_t(0),
                         bias ? static_cast<acc_t>(bias[c]) : acc_t(0), eps, k.scale, k.shift);
    return k;
  }
};

// `y` may be `z`: each element is read before it is written.
template <typename scalar_t, typename acc_t>
__global__ void normalize_act_kernel(const scalar_t* z, AffineOperands<scalar_t> affine,
                                     const scalar_t* res, acc_t slope, scalar_t* y,
                                     int64_t numel, int64_t channels, int64_t inner) {
  using Coefficients = typename AffineOperands<scalar_t>::Coefficients;
  for_each_element(
      numel, channels, inner, [&](int64_t c) { return affine.of(c); },
      [&](int64_t i, const Coefficients& k) {
        acc_t v = static_cast<acc_t>(z[i]) * k.scale + k.shift;
        if (res) v += static_cast<acc_t>(res[i]);
        y[i] = static_cast<scalar_t>(math::leaky_relu(v, slope));
      });
}

void normalize_act(const Tensor& z, const ChannelAffine& affine, const OptTensor& residual,
                   double slope, const Tensor& out) {
  const int64_t numel = z.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const Geometry g = geometry_of(z);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_act_kernel<<<elementwise_blocks(g), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), AffineOperands<scalar_t>(affine),
        data_or_null<scalar_t>(residual), static_cast<acc_t>(slope),
        out.mutable_data_ptr<scalar_t>(), numel, g.channels, g.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- backward_apply -----------------------------------------------------------------------

// grad_z = BN's input gradient (with training-mode BN: v.gamma set) or g; grad_residual = g.
// The sums cover `count` values (all ranks') if given, else this batch's `batch_count`.
template <typename scalar_t, typename acc_t>
__global__ void backward_apply_kernel(BackwardView<scalar_t> v, const acc_t* sum_g,
                                      const acc_t* sum_gx, const acc_t* count, acc_t batch_count,
                                      scalar_t* dz, scalar_t* dres, int64_t numel,
                                      int64_t channels, int64_t inner) {
  struct Coefficients {
    typename BackwardView<scalar_t>::Channel ch;
    acc_t k, mean_g, mean_gx;
  };
  const acc_t n = count ? *count : batch_count;
  const auto coefficients_of = [&](int64_t c) {
    Coefficients co{};
    if (v.gamma) {
      co.ch = v.channel(c);
      math::bn_backward_coefficients(co.ch.gamma, co.ch.invstd, sum_g[c], sum_gx[c], n, co.k,
                                     co.mean_g, co.mean_gx);
    }
    return co;
  };
  for_each_element(numel, channels, inner, coefficients_of,
                   [&](int64_t i, const Coefficients& co) {
                     const acc_t g = v.g(i);
                     dz[i] = static_cast<scalar_t>(
                         v.gamma ? math::bn_input_grad(g, v.x_hat(i, co.ch), co.k, co.mean_g,
                                                       co.mean_gx)
                                 : g);
                     if (dres) dres[i] = static_cast<scalar_t>(g);
                   });
}

void backward_apply(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                    const OptTensor& count, const Tensor& grad_z,
                    const OptTensor& grad_residual) {
  TORCH_INTERNAL_ASSERT(!in.gamma.defined() || (sum_g && sum_gx),
                        "backward_apply: BN without sums");
  const int64_t numel = in.out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(in.out.device());
  const Geometry g = geometry_of(in.out);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(in.out.scalar_type(), "vggbench_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_apply_kernel<<<elementwise_blocks(g), kThreads, 0, stream>>>(
        BackwardView<scalar_t>(in), data_or_null<acc_t>(sum_g), data_or_null<acc_t>(sum_gx),
        data_or_null<acc_t>(count), static_cast<acc_t>(g.count()),
        grad_z.mutable_data_ptr<scalar_t>(),
        grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr, numel,
        g.channels, g.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- update_running_stats -------------------------------------------------------------------

// One block: every thread reads num_batches_tracked (any integer type) for the factor
// before thread 0 increments it, then the threads update the channels in turn. Computed in
// the batch statistics' type T, stored in the running statistics' own (any floating type).
template <typename counter_t, typename running_t, typename T>
__global__ void update_running_stats_kernel(running_t* running_mean, running_t* running_var,
                                            counter_t* num_batches_tracked, const T* batch_mean,
                                            const T* batch_var, const T* count, T batch_count,
                                            bool has_momentum, T momentum, int64_t channels) {
  const T n = count ? *count : batch_count;
  const int64_t tracked = static_cast<int64_t>(*num_batches_tracked) + 1;  // after the increment
  const T factor = has_momentum ? momentum : static_cast<T>(1.0 / static_cast<double>(tracked));
  __syncthreads();  // every read of the counter before its write
  if (threadIdx.x == 0) *num_batches_tracked = static_cast<counter_t>(tracked);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    T mean = static_cast<T>(running_mean[c]), var = static_cast<T>(running_var[c]);
    math::running_update(batch_mean[c], batch_var[c], n, factor, mean, var);
    running_mean[c] = static_cast<running_t>(mean), running_var[c] = static_cast<running_t>(var);
  }
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& batch_mean,
                          const Tensor& batch_var, const OptTensor& count, int64_t batch_count,
                          std::optional<double> momentum) {
  const c10::cuda::CUDAGuard guard(batch_mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(num_batches_tracked.scalar_type(), "vggbench_batches_tracked", [&] {
    using counter_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "vggbench_update_running_stats", [&] {
      using T = scalar_t;
      VGGBENCH_DISPATCH(running_mean.scalar_type(), "vggbench_running_stats", [&] {
        update_running_stats_kernel<<<1, kThreads, 0, stream>>>(
            running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
            num_batches_tracked.mutable_data_ptr<counter_t>(), batch_mean.const_data_ptr<T>(),
            batch_var.const_data_ptr<T>(), data_or_null<T>(count), static_cast<T>(batch_count),
            momentum.has_value(), static_cast<T>(momentum.value_or(0)), batch_mean.size(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

const Kernels kCudaKernels{
    .conv = &aten_conv,
    .conv_backward = &aten_conv_backward,
    .batch_stats = &batch_stats,
    .normalize_act = &normalize_act,
    .update_running_stats = &update_running_stats,
    .backward_reduce = &backward_reduce,
    .backward_apply = &backward_apply,
};

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CUDA, m) { vggbench::register_backend(m, vggbench::kCudaKernels); }
