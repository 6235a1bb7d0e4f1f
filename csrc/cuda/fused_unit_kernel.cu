// CUDA passes of the fused unit (see ../fused_unit.h): float, double, half and bfloat16
// activations, sums accumulated in the op-math type (float, or double for double).
// Reductions are deterministic: block (c, p) reduces a fixed slice of channel c into
// partials[w][c][p] (w: which sum), and one thread per channel combines its parts in
// order, so results depend only on the shape (no atomics).
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

// Grid of the elementwise passes (grid-stride beyond it), and of one thread per channel.
unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::min(ceil_div(numel, kThreads), kMaxBlocks));
}

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

// Tree-reduces each thread's W values over the block in shared memory (component w by
// combine(w, a, b)); thread 0 stores the results at partials[(w * channels + c) * parts + p].
template <int W, typename acc_t, typename Combine>
__device__ void store_block_partials(acc_t (&v)[W], Combine combine, const Split& s,
                                     acc_t* partials) {
  __shared__ acc_t smem[W][kThreads];
  for (int w = 0; w < W; ++w) smem[w][threadIdx.x] = v[w];
  __syncthreads();
  for (int n = kThreads / 2; n > 0; n /= 2) {
    if (threadIdx.x < n) {
      for (int w = 0; w < W; ++w) {
        smem[w][threadIdx.x] = combine(w, smem[w][threadIdx.x], smem[w][threadIdx.x + n]);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int w = 0; w < W; ++w) {
      partials[(w * s.channels + blockIdx.x) * s.parts + blockIdx.y] = smem[w][0];
    }
  }
}

// Channel c's W totals: its parts combined in order.
template <int W, typename acc_t, typename Combine>
__device__ void combine_parts(const acc_t* partials, const Split& s, int64_t c, Combine combine,
                              acc_t (&total)[W]) {
  for (int w = 0; w < W; ++w) {
    const acc_t* part = partials + (w * s.channels + c) * s.parts;
    total[w] = part[0];
    for (int p = 1; p < s.parts; ++p) total[w] = combine(w, total[w], part[p]);
  }
}

struct Sum {
  template <typename T>
  __device__ T operator()(int, T a, T b) const { return a + b; }
};

// Sums of (z - shift) and (z - shift)^2 over a slice; shift = z at (0, c, 0).
template <typename scalar_t, typename acc_t>
__global__ void stats_partials(const scalar_t* z, Split s, acc_t* partials) {
  const int64_t c = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(z[c * s.inner]);
  acc_t v[2] = {acc_t(0), acc_t(0)};
  for_each_in_slice(s, c, blockIdx.y, [&](int64_t k) {
    const acc_t d = static_cast<acc_t>(z[k]) - shift;
    v[0] += d, v[1] += d * d;
  });
  store_block_partials(v, Sum(), s, partials);
}

template <typename scalar_t, typename acc_t>
__global__ void stats_finish(const scalar_t* z, const acc_t* partials, Split s, acc_t* mean,
                             acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= s.channels) return;
  acc_t total[2];
  combine_parts(partials, s, c, Sum(), total);
  math::mean_var(total[0], total[1], static_cast<acc_t>(z[c * s.inner]),
                 static_cast<acc_t>(s.count), mean[c], var[c]);
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& z) {
  const c10::cuda::CUDAGuard guard(z.device());
  const Geometry g = geometry_of(z);
  const auto options = z.options().dtype(stats_dtype(z.scalar_type()));
  if (z.numel() == 0) return {at::zeros({g.channels}, options), at::zeros({g.channels}, options)};
  Tensor mean = at::empty({g.channels}, options), var = at::empty({g.channels}, options);
  const Split s = split_of(g);
  const Tensor partials = at::empty({2, g.channels, s.parts}, options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_channel_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(g.channels), s.parts);
    stats_partials<<<grid, kThreads, 0, stream>>>(z.const_data_ptr<scalar_t>(), s,
                                                  partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finish<<<channel_blocks(g.channels), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), partials.const_data_ptr<acc_t>(), s,
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// The recovery rule's terms (fused_unit_math.h) when xhat is recovered; with xhat given,
// only terms 0 and 1 (sum g, sum g * xhat) are computed and the rest stay 0.
constexpr int kTerms = math::kRecoveryTerms;

template <typename scalar_t, typename acc_t>
__global__ void backward_partials(BackwardView<scalar_t> v, Split s, acc_t* partials) {
  const int64_t c = blockIdx.x;
  acc_t t[kTerms] = {};
  for_each_in_slice(s, c, blockIdx.y, [&](int64_t i) {
    acc_t e[kTerms] = {};
    if (v.xhat) {
      e[0] = v.g(i), e[1] = e[0] * static_cast<acc_t>(v.xhat[i]);
    } else if (v.res) {
      v.template recovery_terms<true>(i, c, e);
    } else {
      v.template recovery_terms<false>(i, c, e);
    }
    for (int w = 0; w < kTerms; ++w) t[w] += e[w];
  });
  store_block_partials(t, Sum(), s, partials);
}

// One thread per channel: its sums, and the rule's verdict (0 when xhat is given).
template <typename scalar_t, typename acc_t>
__global__ void backward_finish(BackwardView<scalar_t> v, const acc_t* partials, Split s,
                                acc_t* sum_g, acc_t* sum_gx, acc_t* recompute) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= s.channels) return;
  acc_t total[kTerms];
  combine_parts(partials, s, c, Sum(), total);
  sum_g[c] = total[0], sum_gx[c] = total[1];
  recompute[c] = v.xhat ? acc_t(0) : v.recompute_flag(total, static_cast<acc_t>(s.count), c);
}

std::tuple<Tensor, Tensor, Tensor> backward_reduce(const BackwardInputs& in) {
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
    const dim3 grid(static_cast<unsigned>(g.channels), s.parts);
    backward_partials<<<grid, kThreads, 0, stream>>>(view, s, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_finish<<<channel_blocks(g.channels), kThreads, 0, stream>>>(
        view, partials.const_data_ptr<acc_t>(), s, sum_g.mutable_data_ptr<acc_t>(),
        sum_gx.mutable_data_ptr<acc_t>(), recompute.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gx, recompute};
}

// ---- Elementwise passes ----------------------------------------------------------------

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

// Grid-stride loop: body(idx, c) for every flat index of a (outer, channels, inner) tensor.
template <typename Body>
__device__ void for_each_element(int64_t numel, int64_t channels, int64_t inner, Body body) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelCursor cur(idx, stride, inner, channels);
  for (; idx < numel; idx += stride, cur.advance()) body(idx, cur.c);
}

// `y` may be `z`: each element is read before it is written.
template <typename scalar_t, typename acc_t>
__global__ void normalize_act_kernel(const scalar_t* z, const acc_t* scale, const acc_t* shift,
                                     const scalar_t* res, acc_t slope, scalar_t* y,
                                     int64_t numel, int64_t channels, int64_t inner) {
  for_each_element(numel, channels, inner, [&](int64_t i, int64_t c) {
    const acc_t a = scale ? scale[c] : acc_t(1), b = shift ? shift[c] : acc_t(0);
    acc_t v = static_cast<acc_t>(z[i]) * a + b;
    if (res) v += static_cast<acc_t>(res[i]);
    y[i] = static_cast<scalar_t>(math::leaky_relu(v, slope));
  });
}

void normalize_act(const Tensor& z, const OptTensor& scale, const OptTensor& shift,
                   const OptTensor& residual, double slope, const Tensor& out) {
  const int64_t numel = z.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const Geometry g = geometry_of(z);
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    normalize_act_kernel<<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), data_or_null<acc_t>(scale), data_or_null<acc_t>(shift),
        data_or_null<scalar_t>(residual), static_cast<acc_t>(slope),
        out.mutable_data_ptr<scalar_t>(), numel, g.channels, g.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
__global__ void backward_apply_kernel(BackwardView<scalar_t> v, const acc_t* k,
                                      const acc_t* mean_g, const acc_t* mean_gx, scalar_t* dz,
                                      scalar_t* dres, int64_t numel, int64_t channels,
                                      int64_t inner) {
  for_each_element(numel, channels, inner, [&](int64_t i, int64_t c) {
    const acc_t gi = v.g(i);
    dz[i] = static_cast<scalar_t>(
        k ? math::bn_input_grad(gi, v.x_hat(i, c), k[c], mean_g[c], mean_gx[c]) : gi);
    if (dres) dres[i] = static_cast<scalar_t>(gi);
  });
}

void backward_apply(const BackwardInputs& in, const OptTensor& k, const OptTensor& mean_g,
                    const OptTensor& mean_gx, const Tensor& grad_z,
                    const OptTensor& grad_residual) {
  const int64_t numel = in.out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(in.out.device());
  const Geometry g = geometry_of(in.out);
  VGGBENCH_DISPATCH(in.out.scalar_type(), "vggbench_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    backward_apply_kernel<<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        BackwardView<scalar_t>(in), data_or_null<acc_t>(k), data_or_null<acc_t>(mean_g),
        data_or_null<acc_t>(mean_gx), grad_z.mutable_data_ptr<scalar_t>(),
        grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr, numel,
        g.channels, g.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const Kernels kCudaKernels{&aten_conv, &aten_conv_backward, &channel_stats, &normalize_act,
                           &backward_reduce, &backward_apply};

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CUDA, m) { vggbench::register_backend(m, vggbench::kCudaKernels); }
