// CUDA passes of the fused unit (the Kernels of ../fused_unit.h): float, double, half and
// bfloat16 activations, statistics and sums in the op-math type (float, or double for
// double). The per-channel maths is fused_unit_math.h's, as on the CPU.
//
// Launches per member: one each (batch_stats, normalize_act, update_running_stats,
// backward_reduce, backward_apply). Nothing else is dispatched (allocations aside, and the
// arrival counters' one-time zeroing below) and nothing is read on the host: everything runs
// on the current stream of the tensors' device.
//
// Reductions are deterministic: block (c, p) sums a fixed slice of channel c into
// partials[w][c][p] (w: which sum), and the block of channel c that finishes last adds the
// parts in order p = 0, 1, ... (PyTorch's Reduce.cuh "last block" pattern), so results
// depend only on the shape. The only atomic is the per-channel arrival count; no value is
// added atomically.
//
// With inner == 1 (NHWC) a reduction block's loads are strided by C; the blocks of one
// slice run side by side (c is the fastest grid index), so neighbouring channels share
// those cache lines in L2.
#include "../affine_view.h"
#include "../backward_view.h"
#include "grid_index.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

// The activation dtypes every pass takes.
#define VGGBENCH_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace vggbench {
namespace {

// The grid partitioning (which block and thread covers which elements) is grid_index.h's,
// checked on the CPU by tests/test_grid_index.py.
using grid::kThreads;
using grid::Split;
// The last block of a channel stages its parts in the block's tree-sum buffer.
static_assert(grid::kMaxParts <= kThreads, "a channel's parts must fit the shared buffer");

// ---- Reductions: block (c, p) -> partials[w][c][p] -> channel c's last block ------------

// Scalar loads: a visit of one element.
Split split_of(const Geometry& g) { return grid::split_of(g.outer, g.channels, g.inner); }

// Channels on x (up to 2^31 - 1 blocks), parts on y (at most kMaxParts of 65535).
dim3 reduction_grid(const Split& s) {
  TORCH_CHECK(s.channels <= INT_MAX, "vggbench: ", s.channels,
              " channels exceed the CUDA grid (at most ", INT_MAX, ")");
  return dim3(static_cast<unsigned>(s.channels), static_cast<unsigned>(s.parts));
}

// Per-channel arrival counters of the reductions: zero between calls (the last block of a
// channel resets its counter), so no launch re-zeroes them. One buffer per (device, stream):
// calls on different streams may run concurrently and must not share counters; calls on one
// stream run in order. A buffer is zeroed once, when created or grown (on its own stream,
// so before any kernel that uses it); retired buffers are kept, as a captured CUDA graph
// may still hold their address. Growing is impossible while the stream is being captured
// (the zeroing would only happen at replay): run the op once on the capture stream, with at
// least as many channels, before capturing. A graph replays with the counters of its
// capture stream, so it must not replay concurrently with eager calls on that stream.
int* arrival_counters(int64_t channels) {
  struct Buffers {
    Tensor current;
    std::vector<Tensor> retired;
  };
  static std::mutex mutex;
  // Leaked: freeing CUDA memory at exit may come after the CUDA runtime's teardown.
  static auto* buffers = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, Buffers>();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const std::lock_guard<std::mutex> lock(mutex);
  Buffers& b = (*buffers)[{stream.device_index(), stream.id()}];
  const int64_t size = b.current.defined() ? b.current.numel() : 0;
  if (size < channels) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                    c10::cuda::CaptureStatus::None,
                "vggbench: the fused op's reduction counters on cuda:",
                static_cast<int>(stream.device_index()), " must grow to ", channels,
                " channels while its stream is being captured into a CUDA graph; run the op once "
                "on that stream (e.g. warm up on the stream passed to torch.cuda.graph(..., "
                "stream=s)) with at least as many channels before capturing");
    if (b.current.defined()) b.retired.push_back(std::move(b.current));
    // doubling keeps the retired buffers few
    b.current = at::zeros({std::max(channels, 2 * size)},
                          at::TensorOptions().dtype(at::kInt).device(at::kCUDA,
                                                                     stream.device_index()));
  }
  return b.current.mutable_data_ptr<int>();
}

// Calls body(offset) for this thread's elements of block (c, p)'s slice (grid::SliceCursor).
template <typename Body>
__device__ void for_each_in_slice(const Split& s, int64_t c, int64_t p, Body body) {
  for (grid::SliceCursor cur(s, c, p, threadIdx.x, kThreads); cur.valid(); cur.advance()) {
    body(cur.offset());
  }
}

// Block (c, p) = (blockIdx.x, blockIdx.y) of a single-launch reduction of W sums per
// channel: tree-sums each thread's W values over the block, thread 0 stores them at
// partials[(w * channels + c) * parts + p] and counts the block in arrivals[c]. The block
// that arrives last adds channel c's parts in order p = 0, 1, ... into `total` and resets
// arrivals[c]; returns true in that block's thread 0 only, which writes the channel's
// outputs. Every thread of every block must call it (it synchronises the block).
template <int W, typename acc_t>
__device__ bool reduce_channel(const acc_t (&v)[W], const Split& s, acc_t* partials,
                               int* arrivals, acc_t (&total)[W]) {
  __shared__ acc_t smem[W][kThreads];
  __shared__ acc_t totals[W];
  __shared__ bool last;
  const int64_t c = blockIdx.x;
  for (int w = 0; w < W; ++w) smem[w][threadIdx.x] = v[w];
  __syncthreads();
  for (int n = kThreads / 2; n > 0; n /= 2) {
    if (threadIdx.x < n) {
      for (int w = 0; w < W; ++w) smem[w][threadIdx.x] += smem[w][threadIdx.x + n];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int w = 0; w < W; ++w) partials[grid::partial_slot(s, w, c, blockIdx.y)] = smem[w][0];
    __threadfence();  // release: the partials reach the whole device before the count does
    last = atomicAdd(arrivals + c, 1) == s.parts - 1;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();  // acquire: order the reads below after the count
  // Stage the parts in parallel (L2 loads: __ldcg skips the L1, which may hold stale lines
  // of other blocks' partials), then W threads add them in order.
  for (int k = threadIdx.x; k < W * s.parts; k += kThreads) {
    const int w = k / s.parts, p = k - w * s.parts;
    smem[w][p] = __ldcg(partials + grid::partial_slot(s, w, c, p));
  }
  __syncthreads();
  if (threadIdx.x < W) {
    const acc_t* part = smem[threadIdx.x];
    acc_t sum = part[0];
    for (int p = 1; p < s.parts; ++p) sum += part[p];
    totals[threadIdx.x] = sum;
  }
  if (threadIdx.x == 0) arrivals[c] = 0;  // every part has arrived: ready for the next call
  __syncthreads();
  if (threadIdx.x != 0) return false;
  for (int w = 0; w < W; ++w) total[w] = totals[w];
  return true;
}

// ---- batch_stats ------------------------------------------------------------------------

// Mean and variance of z + bias per channel, the bias moving the mean only. The blocks sum
// (z - shift) and (z - shift)^2 over their slices; shift = z at (0, c, 0), one sample of the
// channel (math::mean_var: no cancellation when |mean| >> std).
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_kernel(const scalar_t* z, const scalar_t* bias, Split s,
                                   acc_t* partials, int* arrivals, acc_t* mean, acc_t* var) {
  const int64_t c = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(z[c * s.inner]);
  acc_t v[2] = {acc_t(0), acc_t(0)};
  for_each_in_slice(s, c, blockIdx.y, [&](int64_t k) {
    const acc_t d = static_cast<acc_t>(z[k]) - shift;
    v[0] += d, v[1] += d * d;
  });
  acc_t total[2];
  if (!reduce_channel(v, s, partials, arrivals, total)) return;
  math::mean_var(total[0], total[1], shift, static_cast<acc_t>(s.count), mean[c], var[c]);
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
  const dim3 grid = reduction_grid(s);
  int* const arrivals = arrival_counters(g.channels);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats_kernel<<<grid, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(bias), s,
        partials.mutable_data_ptr<acc_t>(), arrivals, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// ---- backward_reduce ----------------------------------------------------------------------

constexpr int kTerms = math::kRecoveryTerms;

// Per channel: sum(g), sum(g * xhat) and the recovery rule's verdict (fused_unit_math.h).
// The blocks sum the rule's terms over their slices, xhat recovered; with xhat given, only
// terms 0 and 1: no rule (verdict 0), and terms 2.. stay 0.
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_kernel(BackwardView<scalar_t> v, Split s, acc_t* partials,
                                       int* arrivals, acc_t* sum_g, acc_t* sum_gx,
                                       acc_t* recompute) {
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
  acc_t total[kTerms];
  if (!reduce_channel(t, s, partials, arrivals, total)) return;
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
  const dim3 grid = reduction_grid(s);
  int* const arrivals = arrival_counters(g.channels);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(in.out.scalar_type(), "vggbench_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_kernel<<<grid, kThreads, 0, stream>>>(
        BackwardView<scalar_t>(in), s, partials.mutable_data_ptr<acc_t>(), arrivals,
        sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>(),
        recompute.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gx, recompute};
}

// ---- Elementwise passes ----------------------------------------------------------------

// Grid of the elementwise passes (grid::elementwise_blocks), scalar loads.
unsigned elementwise_blocks(const Geometry& g) {
  return static_cast<unsigned>(grid::elementwise_blocks(g.outer, g.channels, g.inner));
}

// Grid-stride loop over a (outer, channels, inner) tensor (grid::ElementCursor):
// body(idx, coefficients) for every flat index, with coefficients = per_channel(c)
// recomputed only when the thread's channel changes.
template <typename PerChannel, typename Body>
__device__ void for_each_element(int64_t numel, int64_t channels, int64_t inner,
                                 PerChannel per_channel, Body body) {
  grid::ElementCursor cur(numel, channels, inner, blockIdx.x, threadIdx.x, gridDim.x,
                          blockDim.x);
  if (!cur.valid()) return;
  int64_t channel = cur.channel.c;
  auto coefficients = per_channel(channel);
  for (; cur.valid(); cur.advance()) {
    if (cur.channel.c != channel) channel = cur.channel.c, coefficients = per_channel(channel);
    body(cur.index, coefficients);
  }
}

// ---- normalize_act ------------------------------------------------------------------------

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
    .recover_xhat = nullptr,  // a flagged unit recomputes every channel
};

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CUDA, m) { vggbench::register_backend(m, vggbench::kCudaKernels); }
