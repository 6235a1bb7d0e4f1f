// CUDA passes of the fused unit (the Kernels of ../fused_unit.h): float, double, half and
// bfloat16 activations, statistics and sums in the op-math type (float, or double for
// double). The per-channel maths is fused_unit_math.h's, as on the CPU.
//
// Launches per member: one each (batch_stats, normalize_act, update_running_stats,
// backward_reduce, backward_apply). Nothing else is dispatched (allocations aside, and the
// arrival counters' one-time zeroing below) and nothing is read on the host: everything runs
// on the current stream of the tensors' device.
//
// Memory access, as the fastest NHWC BatchNorm kernels do it (grid_index.h has the index
// maths): a thread visits V consecutive elements with one 16-byte load or store (V = 16 /
// sizeof(scalar_t)) where the pointers are aligned and the layout allows, else one element.
// - Reductions (batch_stats, backward_reduce), one launch each. NHWC: a block is a tile of
//   channels x rows, threads across consecutive channels (a warp reads whole runs of a row)
//   and rows across the rest of the block. NCHW: a block is one channel, the threads along
//   its rows. Each thread keeps a few loads in flight, the block combines its rows with warp
//   shuffles and then its warps in order through shared memory, and stores its sums at
//   partials[w][part][c] (consecutive channels consecutive). The block of a tile that
//   arrives last (PyTorch's Reduce.cuh "last block" pattern) adds the parts, its threads
//   spread over the tile's channels and sums (and, where those leave threads idle, over
//   interleaved runs of parts combined in a fixed tree), and writes the channels' results.
//   Every order of addition depends on the shape only, so results are deterministic; the
//   only atomic is the per-tile arrival count.
// - Elementwise passes (normalize_act, backward_apply): a grid-stride loop of visits; NHWC
//   lanes are consecutive channels, each with its per-channel coefficients in registers; NCHW
//   lanes run along a row and take the coefficients of its channel, or of the next channel
//   past the row's end (rows of 7x7, 14x14: visits straddle rows). Coefficients are
//   recomputed only when a thread's channel changes (the grid keeps it fixed where it can).
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
#include <cstdint>
#include <initializer_list>
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

// The grid partitioning (which block and thread covers which elements, the lanes' channels,
// the partial slots and the finish's reads) is grid_index.h's, checked on the CPU by
// tests/test_grid_index.py.
using grid::kThreads;

// ---- Visits: V consecutive elements, one vector load or store -----------------------------

// Elements of T in 16 bytes: the widest visit.
template <typename T>
constexpr int kVector = 16 / static_cast<int>(sizeof(T));

// A visit's lanes, aligned to their size: one load or store moves them all.
template <typename T, int V>
struct alignas(sizeof(T) * V) Lanes {
  T v[V];
};

// The widest visit the pointers allow (null ones: absent operands): a 16-byte vector where
// all are aligned to it, else 1.
template <typename scalar_t>
int max_width(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kVector<scalar_t>;
}

// The first n lanes at p: one vector load when n == V (p then aligned), else the lanes one
// by one, the others 0.
template <int V, typename T>
__device__ __forceinline__ Lanes<T, V> load_lanes(const T* p, int n = V) {
  if (n == V) return *reinterpret_cast<const Lanes<T, V>*>(p);
  Lanes<T, V> l{};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < n) l.v[k] = p[k];
  }
  return l;
}
// An absent operand's lanes are 0.
template <int V, typename T>
__device__ __forceinline__ Lanes<T, V> load_optional(const T* p, int64_t i, int n = V) {
  return p ? load_lanes<V>(p + i, n) : Lanes<T, V>{};
}
template <int V, typename T>
__device__ __forceinline__ void store_lanes(T* p, const Lanes<T, V>& l, int n = V) {
  if (n == V) {
    *reinterpret_cast<Lanes<T, V>*>(p) = l;
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < n) p[k] = l.v[k];
  }
}

// A visit of the backward passes: the lanes of each activation-sized input the view has.
template <typename scalar_t, int V>
struct BackwardLanes {
  Lanes<scalar_t, V> dy, y, res, xhat;

  // `v` reading these lanes (lane k at index k): backward_view.h's per-element maths on the
  // loaded registers. Every pointer is fixed at compile time (a choice between the lanes and
  // null at run time would put them in local memory): kXhat, whether xhat is given; the
  // residual's lanes are 0 without one, which recovers xhat exactly as without a residual.
  template <bool kXhat>
  __device__ BackwardView<scalar_t> view(BackwardView<scalar_t> v) const {
    v.dy = dy.v, v.y = y.v, v.res = res.v, v.xhat = kXhat ? xhat.v : nullptr;
    return v;
  }
};

template <int V, typename scalar_t>
__device__ __forceinline__ BackwardLanes<scalar_t, V> load_backward(const BackwardView<scalar_t>& v,
                                                                    int64_t i, int n = V) {
  return {load_lanes<V>(v.dy + i, n), load_lanes<V>(v.y + i, n), load_optional<V>(v.res, i, n),
          load_optional<V>(v.xhat, i, n)};
}

// The view of `in` the backward passes read: the residual serves only to recover xhat, so
// with xhat given it is not read (an activation-sized load less per visit, and its alignment
// does not narrow the visits).
template <typename scalar_t>
BackwardView<scalar_t> backward_view(const BackwardInputs& in) {
  BackwardView<scalar_t> v(in);
  if (v.xhat) v.res = nullptr;
  return v;
}

// Calls f(width) with the width (1 or a 16-byte vector) as a compile-time constant.
template <typename scalar_t, typename F>
void with_width(int width, const F& f) {
  if (width == 1) return f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, kVector<scalar_t>>{});
}

// ---- Reductions: block (tile, part) -> partials[w][part][c] -> the tile's last block ------

// Arrival counters of the reductions, one per channel (a reduction counts its tiles' blocks,
// at most one tile per channel; sized by channels, so that warming up with the channels of a
// layout serves the other layout too): zero between calls (the last block of a tile resets
// its counter), so no launch re-zeroes them. One buffer per (device, stream):
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

// Visits a thread loads before using them: loads in flight hide the memory's latency.
constexpr int kVisitsInFlight = 4;

// Block (tile, part) = (blockIdx.x, blockIdx.y) of the one-launch reduction of Source's
// kSums sums per channel (grid::Reduction). Each thread adds its visits lane by lane (NHWC:
// one channel per lane; NCHW: the lanes folded, one channel), the block combines its rows
// (shuffles within a warp, then the warps in order through shared memory) and stores its
// sums at partials[w][part][c]. The block of the tile that arrives last adds the parts
// (grid::Finish), resets the tile's arrival count and has Source::finish write each of the
// tile's channels. The only atomic is the arrival count; every sum's order depends on the
// shape only, so the results are deterministic.
template <int V, typename Source>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(grid::Reduction s, Source src, typename Source::acc_t* partials,
                  int* arrivals) {
  using acc_t = typename Source::acc_t;
  constexpr int W = Source::kSums;
  constexpr int kRow = grid::kWarpSize * V;  // a warp's sums: slot x * V + lane < tx * V
  static_assert(W <= grid::kWarps, "a tile's totals must fit the shared buffer");
  static_assert(kRow <= kThreads, "a tile's channels (at most kRow) must have a thread each");
  __shared__ acc_t smem[grid::shared_sums(V)];
  __shared__ bool last;
  const int64_t tile = blockIdx.x, part = blockIdx.y;
  const int thread = threadIdx.x;

  acc_t sums[V][W] = {};
  grid::SliceCursor cur(s, tile, part, thread);
  if (cur.valid()) {
    typename Source::Lane lanes[V];
#pragma unroll
    for (int k = 0; k < V; ++k) lanes[k] = src.lane(cur.lane_channel(k));
    while (cur.valid()) {
      typename Source::Visit visits[kVisitsInFlight];
      int n = 0;
#pragma unroll
      for (int u = 0; u < kVisitsInFlight; ++u) {
        if (cur.valid()) visits[u] = src.load(cur.offset()), cur.advance(), ++n;
      }
#pragma unroll
      for (int u = 0; u < kVisitsInFlight; ++u) {
        if (u >= n) continue;
#pragma unroll
        for (int k = 0; k < V; ++k) src.add(visits[u], k, lanes[k], sums[k]);
      }
    }
  }
  if (!s.across()) {  // the lanes are one channel's
#pragma unroll
    for (int k = 1; k < V; ++k) {
#pragma unroll
      for (int w = 0; w < W; ++w) sums[0][w] += sums[k][w];
    }
  }
  const int x = thread % s.tx, warp = thread / grid::kWarpSize, lane = thread % grid::kWarpSize;
  const int64_t n = s.tile_channels(tile);
#pragma unroll
  for (int w = 0; w < W; ++w) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k > 0 && !s.across()) break;
      // the warp's rows of column x (lanes x, x + tx, ...) in a fixed tree
      acc_t v = sums[k][w];
      for (int offset = grid::kWarpSize / 2; offset >= s.tx; offset /= 2) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
      }
      if (lane < s.tx) smem[warp * kRow + s.slot_of(x, k)] = v;
    }
    __syncthreads();
    if (thread < n) {
      acc_t sum = smem[thread];
      for (int r = 1; r < grid::kWarps; ++r) sum += smem[r * kRow + thread];
      partials[s.partial_slot(w, part, s.slot_channel(tile, thread))] = sum;
    }
    __syncthreads();
  }
  __threadfence();  // release: the partials reach the whole device before the count does
  __syncthreads();
  if (thread == 0) last = atomicAdd(arrivals + tile, 1) == s.parts - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // acquire: order the loads below after the count
  const grid::Finish f(W, n);
  for (int q = thread; q < f.tasks(); q += kThreads) {
    const int64_t c = s.slot_channel(tile, f.slot_of(q));
    acc_t sum = acc_t(0);
    // L2 loads: __ldcg skips the L1, which may hold stale lines of other blocks' partials
#pragma unroll 8
    for (int p = f.first_part(q); p < s.parts; p += f.groups) {
      sum += __ldcg(partials + s.partial_slot(f.sum_of(q), p, c));
    }
    smem[q] = sum;
  }
  __syncthreads();
  for (int h = f.groups / 2; h > 0; h /= 2) {
    for (int q = thread; q < h * f.pairs; q += kThreads) smem[q] += smem[q + h * f.pairs];
    __syncthreads();
  }
  if (thread == 0) arrivals[tile] = 0;  // every part has arrived: ready for the next call
  if (thread < n) {
    acc_t total[W];
#pragma unroll
    for (int w = 0; w < W; ++w) total[w] = smem[w * n + thread];
    src.finish(s.slot_channel(tile, thread), total);
  }
}

// One launch of reduce_kernel over s's grid (tiles, parts).
template <int V, typename Source>
void launch_reduction(const grid::Reduction& s, const Source& src,
                      const at::TensorOptions& options) {
  using acc_t = typename Source::acc_t;
  TORCH_CHECK(s.tiles <= INT_MAX, "vggbench: ", s.channels, " channels exceed the CUDA grid");
  const Tensor partials = at::empty({Source::kSums, s.parts, s.channels}, options);
  int* const arrivals = arrival_counters(s.channels);
  const dim3 grid(static_cast<unsigned>(s.tiles), static_cast<unsigned>(s.parts));
  reduce_kernel<V><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s, src, partials.mutable_data_ptr<acc_t>(), arrivals);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- batch_stats ------------------------------------------------------------------------

// Mean and variance of z + bias per channel, the bias moving the mean only. The blocks sum
// (z - shift) and (z - shift)^2; shift = z at (0, c, 0), one sample of the channel
// (math::mean_var: no cancellation when |mean| >> std).
template <typename scalar_t, int V>
struct StatsSums {
  using acc_t = at::opmath_type<scalar_t>;
  using Lane = acc_t;  // the shift
  using Visit = Lanes<scalar_t, V>;
  static constexpr int kSums = 2;
  const scalar_t *z, *bias;
  acc_t *mean, *var;
  int64_t inner;
  acc_t count;

  __device__ Lane lane(int64_t c) const { return static_cast<acc_t>(z[c * inner]); }
  __device__ Visit load(int64_t i) const { return load_lanes<V>(z + i); }
  __device__ void add(const Visit& v, int k, Lane shift, acc_t (&t)[kSums]) const {
    const acc_t d = static_cast<acc_t>(v.v[k]) - shift;
    t[0] += d, t[1] += d * d;
  }
  __device__ void finish(int64_t c, const acc_t (&t)[kSums]) const {
    math::mean_var(t[0], t[1], lane(c), count, mean[c], var[c]);
    if (bias) mean[c] += static_cast<acc_t>(bias[c]);
  }
};

std::tuple<Tensor, Tensor> batch_stats(const Tensor& z, const OptTensor& bias) {
  const c10::cuda::CUDAGuard guard(z.device());
  const Geometry g = geometry_of(z);
  const auto options = z.options().dtype(stats_dtype(z.scalar_type()));
  if (z.numel() == 0) return {at::zeros({g.channels}, options), at::zeros({g.channels}, options)};
  Tensor mean = at::empty({g.channels}, options), var = at::empty({g.channels}, options);
  VGGBENCH_DISPATCH(z.scalar_type(), "vggbench_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = z.const_data_ptr<scalar_t>();
    const grid::Reduction s =
        grid::reduction_of(g.outer, g.channels, g.inner, max_width<scalar_t>({data}));
    with_width<scalar_t>(s.width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      launch_reduction<V>(s,
                          StatsSums<scalar_t, V>{data, data_or_null<scalar_t>(bias),
                                                 mean.mutable_data_ptr<acc_t>(),
                                                 var.mutable_data_ptr<acc_t>(), g.inner,
                                                 static_cast<acc_t>(g.count())},
                          options);
    });
  });
  return {mean, var};
}

// ---- backward_reduce ----------------------------------------------------------------------

// Per channel: sum(g), sum(g * xhat) and the recovery rule's verdict (fused_unit_math.h).
template <typename scalar_t, int V>
struct BackwardSums {
  using acc_t = at::opmath_type<scalar_t>;
  using Visit = BackwardLanes<scalar_t, V>;
  BackwardView<scalar_t> v;
  acc_t *sum_g, *sum_gx, *recompute;

  __device__ Visit load(int64_t i) const { return load_backward<V>(v, i); }
  __device__ void store(int64_t c, acc_t g, acc_t gx, acc_t flag) const {
    sum_g[c] = g, sum_gx[c] = gx, recompute[c] = flag;
  }
};

// xhat given (v.res null: not read): the two sums, no rule (verdict 0).
template <typename scalar_t, int V>
struct GivenXhatSums : BackwardSums<scalar_t, V> {
  using typename BackwardSums<scalar_t, V>::acc_t;
  using typename BackwardSums<scalar_t, V>::Visit;
  struct Lane {};
  static constexpr int kSums = 2;

  __device__ Lane lane(int64_t) const { return {}; }
  __device__ void add(const Visit& l, int k, Lane, acc_t (&t)[kSums]) const {
    const BackwardView<scalar_t> lv = l.template view<true>(this->v);
    const acc_t g = lv.g(k);
    t[0] += g, t[1] += g * static_cast<acc_t>(lv.xhat[k]);
  }
  __device__ void finish(int64_t c, const acc_t (&t)[kSums]) const {
    this->store(c, t[0], t[1], acc_t(0));
  }
};

// xhat recovered: the rule's terms with xhat recovered (terms 0 and 1: the sums);
// HasResidual: whether v.res is set.
template <typename scalar_t, int V, bool HasResidual>
struct RecoveredXhatSums : BackwardSums<scalar_t, V> {
  using typename BackwardSums<scalar_t, V>::acc_t;
  using typename BackwardSums<scalar_t, V>::Visit;
  using Lane = typename BackwardView<scalar_t>::Channel;
  static constexpr int kSums = math::kRecoveryTerms;
  acc_t count;

  __device__ Lane lane(int64_t c) const { return this->v.channel(c); }
  __device__ void add(const Visit& l, int k, const Lane& ch, acc_t (&t)[kSums]) const {
    acc_t e[kSums];
    l.template view<false>(this->v).template recovery_terms<HasResidual>(k, ch, e);
#pragma unroll
    for (int w = 0; w < kSums; ++w) t[w] += e[w];
  }
  __device__ void finish(int64_t c, const acc_t (&t)[kSums]) const {
    this->store(c, t[0], t[1], this->v.recompute_flag(t, count, this->v.channel(c)));
  }
};

std::tuple<Tensor, Tensor, Tensor> backward_reduce(const BackwardInputs& in) {
  // recovering xhat needs training-mode BN's operands
  TORCH_INTERNAL_ASSERT(in.xhat || in.gamma.defined(), "backward_reduce: no xhat and no BN");
  TORCH_INTERNAL_ASSERT(!in.xhat_affine, "backward_reduce: the CUDA passes take xhat itself");
  const c10::cuda::CUDAGuard guard(in.out.device());
  const Geometry g = geometry_of(in.out);
  const auto options = in.out.options().dtype(stats_dtype(in.out.scalar_type()));
  if (in.out.numel() == 0) {
    return {at::zeros({g.channels}, options), at::zeros({g.channels}, options),
            at::zeros({g.channels}, options)};
  }
  Tensor sum_g = at::empty({g.channels}, options), sum_gx = at::empty({g.channels}, options),
         recompute = at::empty({g.channels}, options);
  VGGBENCH_DISPATCH(in.out.scalar_type(), "vggbench_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = backward_view<scalar_t>(in);
    const grid::Reduction s = grid::reduction_of(
        g.outer, g.channels, g.inner, max_width<scalar_t>({v.dy, v.y, v.res, v.xhat}));
    with_width<scalar_t>(s.width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const BackwardSums<scalar_t, V> sums{v, sum_g.mutable_data_ptr<acc_t>(),
                                           sum_gx.mutable_data_ptr<acc_t>(),
                                           recompute.mutable_data_ptr<acc_t>()};
      const auto count = static_cast<acc_t>(g.count());
      if (v.xhat) {
        launch_reduction<V>(s, GivenXhatSums<scalar_t, V>{sums}, options);
      } else if (v.res) {
        launch_reduction<V>(s, RecoveredXhatSums<scalar_t, V, true>{sums, count}, options);
      } else {
        launch_reduction<V>(s, RecoveredXhatSums<scalar_t, V, false>{sums, count}, options);
      }
    });
  });
  return {sum_g, sum_gx, recompute};
}

// ---- Elementwise passes ----------------------------------------------------------------

// Grid-stride loop of an elementwise pass over a (outer, channels, inner) tensor
// (grid::ElementCursor, visits of V lanes), kVisitsInFlight visits loaded at a time:
// apply(index, lanes, load(index, lanes), coefficients) for every visit, with
// coefficients(k) = per_channel(lane k's channel).
template <int V, bool kAcross, typename PerChannel, typename Load, typename Apply>
__device__ void for_each_visit(int64_t numel, int64_t channels, int64_t inner,
                               const PerChannel& per_channel, const Load& load,
                               const Apply& apply) {
  using Co = decltype(per_channel(int64_t{0}));
  using Visit = decltype(load(int64_t{0}, 0));
  grid::LaneCoefficients<Co, V, kAcross> co;
  grid::ElementCursor cur(numel, channels, inner, blockIdx.x, threadIdx.x, gridDim.x,
                          blockDim.x, V);
  while (cur.valid()) {
    grid::ElementCursor at[kVisitsInFlight];
    Visit visits[kVisitsInFlight];
    int n = 0;
#pragma unroll
    for (int u = 0; u < kVisitsInFlight; ++u) {
      if (cur.valid()) at[u] = cur, visits[u] = load(cur.index, cur.lanes()), cur.advance(), ++n;
    }
#pragma unroll
    for (int u = 0; u < kVisitsInFlight; ++u) {
      if (u >= n) break;
      co.update(at[u].channel, per_channel);
      apply(at[u].index, at[u].lanes(), visits[u],
            [&](int k) { return co.of(at[u].channel, k); });
    }
  }
}

// Grid of the elementwise passes (grid::elementwise_blocks).
unsigned elementwise_blocks(const Geometry& g, int width) {
  return static_cast<unsigned>(grid::elementwise_blocks(g.outer, g.channels, g.inner, width));
}

// ---- normalize_act ------------------------------------------------------------------------

// `y` may be `z`: each element is read before it is written.
template <typename scalar_t, int V, bool kAcross>
__global__ void __launch_bounds__(kThreads)
    normalize_act_kernel(const scalar_t* z, AffineOperands<scalar_t> affine, const scalar_t* res,
                         at::opmath_type<scalar_t> slope, scalar_t* y, int64_t numel,
                         int64_t channels, int64_t inner) {
  using acc_t = at::opmath_type<scalar_t>;
  struct Visit {
    Lanes<scalar_t, V> z, res;
  };
  for_each_visit<V, kAcross>(
      numel, channels, inner, [&](int64_t c) { return affine.of(c); },
      [&](int64_t i, int n) { return Visit{load_lanes<V>(z + i, n), load_optional<V>(res, i, n)}; },
      [&](int64_t i, int n, const Visit& in, const auto& coefficients) {
        Lanes<scalar_t, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const auto co = coefficients(k);
          acc_t v = static_cast<acc_t>(in.z.v[k]) * co.scale + co.shift;
          if (res) v += static_cast<acc_t>(in.res.v[k]);
          out.v[k] = static_cast<scalar_t>(math::leaky_relu(v, slope));
        }
        store_lanes<V>(y + i, out, n);
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
    const scalar_t *zs = z.const_data_ptr<scalar_t>(), *res = data_or_null<scalar_t>(residual);
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int width =
        grid::elementwise_width(g.channels, g.inner, max_width<scalar_t>({zs, res, y}));
    grid::with_visit<kVector<scalar_t>>(width, g.inner, [&](auto lanes, auto across) {
      normalize_act_kernel<scalar_t, decltype(lanes)::value, decltype(across)::value>
          <<<elementwise_blocks(g, width), kThreads, 0, stream>>>(
              zs, AffineOperands<scalar_t>(affine), res, static_cast<acc_t>(slope), y, numel,
              g.channels, g.inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---- backward_apply -----------------------------------------------------------------------

// grad_z = BN's input gradient (with training-mode BN: v.gamma set) or g; grad_residual = g.
// The sums cover `count` values (all ranks') if given, else this batch's `batch_count`.
// kXhat: whether v.xhat is set.
template <typename scalar_t, int V, bool kAcross, bool kXhat>
__global__ void __launch_bounds__(kThreads)
    backward_apply_kernel(BackwardView<scalar_t> v, const at::opmath_type<scalar_t>* sum_g,
                          const at::opmath_type<scalar_t>* sum_gx,
                          const at::opmath_type<scalar_t>* count,
                          at::opmath_type<scalar_t> batch_count, scalar_t* dz, scalar_t* dres,
                          int64_t numel, int64_t channels, int64_t inner) {
  using acc_t = at::opmath_type<scalar_t>;
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
  for_each_visit<V, kAcross>(
      numel, channels, inner, coefficients_of,
      [&](int64_t i, int lanes) { return load_backward<V>(v, i, lanes); },
      [&](int64_t i, int lanes, const BackwardLanes<scalar_t, V>& in, const auto& coefficients) {
        const BackwardView<scalar_t> lv = in.template view<kXhat>(v);
        Lanes<scalar_t, V> gz, gr;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const Coefficients co = coefficients(k);
          const acc_t g = lv.g(k);
          gz.v[k] = static_cast<scalar_t>(
              v.gamma ? math::bn_input_grad(g, lv.x_hat(k, co.ch), co.k, co.mean_g, co.mean_gx)
                      : g);
          gr.v[k] = static_cast<scalar_t>(g);
        }
        store_lanes<V>(dz + i, gz, lanes);
        if (dres) store_lanes<V>(dres + i, gr, lanes);
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
    const auto v = backward_view<scalar_t>(in);
    scalar_t* dz = grad_z.mutable_data_ptr<scalar_t>();
    scalar_t* dres = grad_residual ? grad_residual->mutable_data_ptr<scalar_t>() : nullptr;
    const int width = grid::elementwise_width(
        g.channels, g.inner, max_width<scalar_t>({v.dy, v.y, v.res, v.xhat, dz, dres}));
    grid::with_visit<kVector<scalar_t>>(width, g.inner, [&](auto lanes, auto across) {
      const auto launch = [&](auto xhat) {
        backward_apply_kernel<scalar_t, decltype(lanes)::value, decltype(across)::value,
                              decltype(xhat)::value>
            <<<elementwise_blocks(g, width), kThreads, 0, stream>>>(
                v, data_or_null<acc_t>(sum_g), data_or_null<acc_t>(sum_gx),
                data_or_null<acc_t>(count), static_cast<acc_t>(g.count()), dz, dres, numel,
                g.channels, g.inner);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (v.xhat) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
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
    .reads_xhat_affine = false,
};

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_IMPL(vggbench, CUDA, m) { vggbench::register_backend(m, vggbench::kCudaKernels); }
