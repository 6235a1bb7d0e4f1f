// Which block and thread of the CUDA passes (fused_unit_kernel.cu) covers which elements of
// an (outer, channels, inner) tensor, the element (o, c, i) at offset
// (o * channels + c) * inner + i: NCHW is (N, C, H * W), NHWC (N * H * W, C, 1). Plain C++
// as well, so that the CPU ops _grid_coverage_* (../grid_coverage.cpp) can run every
// (block, thread) of a grid through these functions for tests/test_grid_index.py.
//
// A thread visits `width` consecutive elements at once (its lanes: one 16-byte vector load
// where the layout and alignment allow, else width 1). With inner == 1 (NHWC) the lanes of a
// visit are consecutive channels of one row; otherwise they run along a channel's rows.
#pragma once

#include "../host_device.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

namespace vggbench::grid {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxParts = 128;            // blocks per channel (tile) in a reduction
constexpr int kMinVisits = 4;             // a reduction thread's visits per part, at least
constexpr int64_t kTargetBlocks = 1024;   // a reduction's grid: about one wave of a large GPU
constexpr int64_t kVisitsPerThread = 8;   // an elementwise thread's visits, where there are enough
constexpr int64_t kMinBlocks = 256;       // an elementwise grid, at least (or a visit per thread)
constexpr int64_t kMaxBlocks = 4096;      // an elementwise grid, at most

VGGBENCH_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The width of a visit: `max_width` (a 16-byte vector; 1 where the pointers are not aligned
// to it) where every visit of the layout is whole and within one row (reductions: the lanes
// are one channel's, or consecutive channels'), else 1. Reductions need channels (NHWC) or
// inner (NCHW) to be a multiple of the width.
inline int reduction_width(int64_t channels, int64_t inner, int max_width) {
  return (inner == 1 ? channels : inner) % max_width == 0 ? max_width : 1;
}
// Elementwise passes: NHWC as reductions; NCHW takes any row at least `max_width` long (a
// visit then spans at most two channels, its tail lanes the next one's).
inline int elementwise_width(int64_t channels, int64_t inner, int max_width) {
  return inner == 1 ? reduction_width(channels, inner, max_width) : inner >= max_width ? max_width : 1;
}

// ---- Reductions: block (tile, part) sums part `part` of the channels of tile `tile` ------

// NHWC (inner == 1): a block is a tile of channels x rows. Thread t = y * tx + x loads
// channels [c, c + width) (c = tile * tile_size + x * width) of rows j = begin + y,
// begin + y + ty, ... (ty = kThreads / tx): consecutive threads read consecutive channels,
// so a warp's loads are whole runs of a row. tx is a power of 2 up to a warp, so a warp holds
// whole rows of the tile (and its row sums combine by shuffles).
// NCHW: a block is one channel (tile = channel, tx = 1); thread y visits positions
// j = o * inner + i = begin + y * width, then every kThreads * width.
// Channel c's `count` = outer * inner positions split into parts [p * chunk, min((p + 1) *
// chunk, count)), chunk a multiple of the width (NCHW), so parts start on a visit boundary.
struct Reduction {
  int64_t channels, inner, count;
  int width, tx;
  int64_t tile_size, tiles, chunk;
  int parts;

  VGGBENCH_HD bool across() const { return inner == 1; }  // lanes across channels
  VGGBENCH_HD int ty() const { return kThreads / tx; }
  // positions a thread steps along a channel per visit
  VGGBENCH_HD int position_step() const { return across() ? 1 : width; }
  // The channels of tile t, and the channel of its slot s < tile_channels(t) (a block's
  // sums per channel are its slots: x * width + lane across, else slot 0).
  VGGBENCH_HD int64_t tile_channels(int64_t t) const {
    if (!across()) return 1;
    const int64_t rest = channels - t * tile_size;
    return rest < tile_size ? rest : tile_size;
  }
  VGGBENCH_HD int64_t slot_channel(int64_t t, int64_t slot) const {
    return across() ? t * tile_size + slot : t;
  }
  VGGBENCH_HD int slot_of(int x, int lane) const { return across() ? x * width + lane : 0; }
  // Where block (t, p) stores its sum w of channel c: partials[w][p][c] (consecutive channels
  // consecutive: the stores and the finish's loads are coalesced).
  VGGBENCH_HD int64_t partial_slot(int w, int64_t p, int64_t c) const {
    return (w * parts + p) * channels + c;
  }
};

// A reduction block's shared buffer, in sums: a row of kWarpSize * width slots per warp for
// the combine, reused by the finish for its tasks (grid::Finish::tasks).
constexpr int shared_sums(int width) { return kWarps * kWarpSize * width; }

inline int64_t power_of_2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// The plan of a reduction of an (outer, channels, inner) tensor, visits at most max_width
// wide: enough parts per channel to give about kTargetBlocks blocks and each thread at least
// kMinVisits visits, at most kMaxParts.
inline Reduction reduction_of(int64_t outer, int64_t channels, int64_t inner, int max_width) {
  Reduction s{channels, inner, outer * inner, reduction_width(channels, inner, max_width), 1,
              1, channels, 0, 1};
  if (s.across()) {
    s.tx = static_cast<int>(std::min<int64_t>(kWarpSize, power_of_2_at_least(channels / s.width)));
    s.tile_size = int64_t{s.tx} * s.width;
    s.tiles = ceil_div(channels, s.tile_size);
  }
  const int64_t per_round = int64_t{s.ty()} * s.position_step();  // a block's positions per visit
  const int64_t parts = std::min(ceil_div(s.count, per_round * kMinVisits),
                                 ceil_div(kTargetBlocks, s.tiles));
  s.chunk = ceil_div(ceil_div(s.count, std::clamp<int64_t>(parts, 1, kMaxParts)), s.position_step()) *
            s.position_step();
  s.parts = static_cast<int>(ceil_div(s.count, s.chunk));  // none empty
  return s;
}

// Thread `thread` of block (tile, part): its visits of the block's part (x, y as above);
// (o, i) follow j without a division per step.
struct SliceCursor {
  int64_t channels, inner, c, j, end, o, i, step, step_o, step_i;
  bool across;

  VGGBENCH_HD SliceCursor(const Reduction& s, int64_t tile, int64_t part, int thread)
      : channels(s.channels), inner(s.inner),
        c(s.slot_channel(tile, s.slot_of(thread % s.tx, 0))),
        j(part * s.chunk + int64_t{thread / s.tx} * s.position_step()),
        end((part + 1) * s.chunk < s.count ? (part + 1) * s.chunk : s.count), o(j / s.inner),
        i(j - o * s.inner), step(int64_t{s.ty()} * s.position_step()), step_o(step / s.inner),
        step_i(step % s.inner), across(s.across()) {}

  // Whether the thread has a visit here (threads past the last channel have none).
  VGGBENCH_HD bool valid() const { return c < channels && j < end; }
  // The offset of the visit's first element; lane k is at offset() + k.
  VGGBENCH_HD int64_t offset() const { return (o * channels + c) * inner + i; }
  // The channel of lane k.
  VGGBENCH_HD int64_t lane_channel(int k) const { return across ? c + k : c; }
  VGGBENCH_HD void advance() {
    j += step;
    i += step_i, o += step_o;
    if (i >= inner) i -= inner, ++o;
  }
};

// The last block of a tile adds each of its `pairs` = sums x tile channels (pair = w * n +
// slot) over the parts. Where pairs leave threads idle, `groups` (a power of 2) threads share
// a pair: task q = group * pairs + pair adds parts group, group + groups, ... in order, and the
// groups' results combine in a fixed tree (group g += group g + h for h = groups / 2, ..., 1);
// otherwise each task is a whole pair, in order p = 0, 1, ... (deterministic either way).
struct Finish {
  int n, pairs, groups;

  VGGBENCH_HD Finish(int sums, int64_t tile_channels)
      : n(static_cast<int>(tile_channels)), pairs(sums * n), groups(1) {
    while (pairs * groups * 2 <= kThreads) groups *= 2;
  }
  VGGBENCH_HD int tasks() const { return pairs * groups; }
  VGGBENCH_HD int sum_of(int q) const { return q % pairs / n; }
  VGGBENCH_HD int slot_of(int q) const { return q % pairs % n; }
  VGGBENCH_HD int first_part(int q) const { return q / pairs; }
};

// ---- Elementwise passes: a grid-stride loop over the flat index ---------------------------

// Blocks of an elementwise pass, a grid-stride loop: kVisitsPerThread visits per thread
// (a thread's per-channel coefficients, a few divisions and a square root per lane, cost as
// much as several visits), but at least kMinBlocks blocks to spread over the GPU (fewer where
// a visit per thread needs fewer), at most kMaxBlocks. A flat index's channel repeats with
// period channels * inner; where it fits, the stride (blocks * kThreads * width) is a
// multiple of that period, so a thread's visits all start on one channel (NHWC: its lanes
// stay on the same channels) and it computes its coefficients once.
inline int64_t elementwise_blocks(int64_t outer, int64_t channels, int64_t inner, int width) {
  const int64_t per_block = int64_t{kThreads} * width;
  const int64_t visits = ceil_div(outer * channels * inner, per_block);  // per thread of 1 block
  const int64_t blocks = std::clamp(ceil_div(visits, kVisitsPerThread),
                                    std::min(visits, kMinBlocks), kMaxBlocks);
  const int64_t period = channels * inner;
  // the fewest blocks whose threads span whole periods
  const int64_t unit = period / std::gcd(period, per_block);
  return unit <= blocks ? blocks / unit * unit : blocks;
}

// Calls f(lanes, across) with an elementwise pass's visit as compile-time constants, for a
// width elementwise_width gave with vectors of V: scalar, or V-wide vectors across channels
// (NHWC) or along rows (NCHW).
template <int V, typename F>
void with_visit(int width, int64_t inner, const F& f) {
  if (width == 1) return f(std::integral_constant<int, 1>{}, std::false_type{});
  if (inner == 1) return f(std::integral_constant<int, V>{}, std::true_type{});
  f(std::integral_constant<int, V>{}, std::false_type{});
}

// The channel (idx / inner) % channels of a grid-stride index, kept up to date as idx
// advances by `stride`: two divisions per thread rather than per element.
struct ChannelCursor {
  int64_t inner, channels, i, c, step_i, step_c;

  ChannelCursor() = default;
  VGGBENCH_HD ChannelCursor(int64_t idx, int64_t stride, int64_t inner, int64_t channels)
      : inner(inner), channels(channels), i(idx % inner), c((idx / inner) % channels),
        step_i(stride % inner), step_c((stride / inner) % channels) {}

  VGGBENCH_HD void advance() {
    i += step_i;
    const int64_t carry = i >= inner;
    if (carry) i -= inner;
    c += step_c + carry;
    if (c >= channels) c -= channels;
  }

  // The channel of idx + k (lane 0: c) for a width elementwise_width allows: with inner == 1
  // channel c + k (the width divides channels: a visit stays in its row); else c, or the
  // next channel once the lane passes the row's end (rows at least width long).
  VGGBENCH_HD int64_t lane_channel(int k) const {
    if (inner == 1) return c + k;
    if (i + k < inner) return c;
    return c + 1 == channels ? 0 : c + 1;
  }
};

// The per-channel coefficients of a visit's lanes: lane k takes per_channel(lane_channel(k)),
// computed when the thread's channel changes. kAcross (NHWC): lane k is channel c + k.
template <typename Co, int V, bool kAcross>
struct LaneCoefficients {
  int64_t c = -1;
  Co co[V]{};

  template <typename PerChannel>
  VGGBENCH_HD void update(const ChannelCursor& cur, const PerChannel& per_channel) {
    if (cur.c == c) return;
    c = cur.c;
    for (int k = 0; k < V; ++k) co[k] = per_channel(cur.lane_channel(k));
  }
  VGGBENCH_HD Co of(const ChannelCursor&, int k) const { return co[k]; }
};

// Along a row (NCHW): channel c, or for the lanes past the row's end the next channel
// (computed when a visit first reaches it, kept for when the thread moves on to it).
template <typename Co, int V>
struct LaneCoefficients<Co, V, false> {
  int64_t c = -1, next = -1;
  Co co{}, next_co{};

  template <typename PerChannel>
  VGGBENCH_HD void update(const ChannelCursor& cur, const PerChannel& per_channel) {
    if (cur.c != c) {
      co = cur.c == next ? next_co : per_channel(cur.c);
      c = cur.c;
    }
    const int64_t last = cur.lane_channel(V - 1);
    if (last != c && last != next) next = last, next_co = per_channel(last);
  }
  VGGBENCH_HD Co of(const ChannelCursor& cur, int k) const {
    return cur.lane_channel(k) == c ? co : next_co;
  }
};

// Thread `thread` of block `block` in a grid of `blocks` blocks of `threads`: visits start at
// index = (block * threads + thread) * width, then every blocks * threads * width, while
// below numel; channel.c is the channel of a visit's first element. The last visit may be
// short (numel not a multiple of the width).
struct ElementCursor {
  int64_t numel, index, stride;
  ChannelCursor channel;
  int width;

  ElementCursor() = default;
  VGGBENCH_HD ElementCursor(int64_t numel, int64_t channels, int64_t inner, int64_t block,
                            int64_t thread, int64_t blocks, int64_t threads, int width)
      : numel(numel), index((block * threads + thread) * width),
        stride(blocks * threads * width), channel(index, stride, inner, channels),
        width(width) {}

  VGGBENCH_HD bool valid() const { return index < numel; }
  VGGBENCH_HD int lanes() const {
    return numel - index < width ? static_cast<int>(numel - index) : width;
  }
  VGGBENCH_HD void advance() { index += stride, channel.advance(); }
};

}  // namespace vggbench::grid
