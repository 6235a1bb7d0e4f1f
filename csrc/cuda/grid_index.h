// Which block and thread of the CUDA passes (fused_unit_kernel.cu) covers which elements of
// an (outer, channels, inner) tensor, the element (o, c, i) at offset
// (o * channels + c) * inner + i: NCHW is (N, C, H * W), NHWC (N * H * W, C, 1). Plain C++
// as well, so that the CPU ops _grid_coverage_* (../grid_coverage.cpp) can run every
// (block, thread) of a grid through these functions for tests/test_grid_index.py.
//
// `width`: the consecutive elements a thread visits at once (a vector load: 16 bytes over
// the element size; 1 for scalar loads). Lane k < lanes() of a visit is its first index + k;
// the last visit of a range may be short (the tail).
#pragma once

#include "../host_device.h"

#include <algorithm>
#include <cstdint>
#include <numeric>

namespace vggbench::grid {

constexpr int kThreads = 256;                       // threads per block, every kernel
constexpr int kMaxParts = 128;                      // blocks per channel in a reduction
constexpr int64_t kMinPartElements = 4 * kThreads;  // so each thread loads a few values
constexpr int64_t kMaxBlocks = 4096;                // elementwise grid; grid-stride beyond

VGGBENCH_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- Reductions: block (c, p) sums part p of channel c ----------------------------------

// How a reduction splits each channel's `count` = outer * inner elements (j = o * inner + i):
// block (c, p) takes [p * chunk, min((p + 1) * chunk, count)), chunk a multiple of the width
// so that parts start on a visit boundary.
struct Split {
  int64_t channels, inner, count, chunk;
  int parts;
};

inline Split split_of(int64_t outer, int64_t channels, int64_t inner, int width = 1) {
  const int64_t count = outer * inner;
  const int parts =
      static_cast<int>(std::clamp<int64_t>(ceil_div(count, kMinPartElements), 1, kMaxParts));
  return {channels, inner, count, ceil_div(ceil_div(count, parts), width) * width, parts};
}

// Where block (c, p) of a reduction of several sums per channel stores its sum w:
// partials[w][c][p].
VGGBENCH_HD int64_t partial_slot(const Split& s, int w, int64_t c, int64_t p) {
  return (w * s.channels + c) * s.parts + p;
}

// Thread `thread` (of `threads`) of block (c, p): its visits of the block's part start at
// j = begin + thread * width, then every threads * width; (o, i) follow j without a division
// per step.
struct SliceCursor {
  int64_t channels, inner, c, j, end, o, i, step, step_o, step_i;
  int width;

  VGGBENCH_HD SliceCursor(const Split& s, int64_t c, int64_t p, int64_t thread,
                          int64_t threads, int width = 1)
      : channels(s.channels), inner(s.inner), c(c), j(p * s.chunk + thread * width),
        end((p + 1) * s.chunk < s.count ? (p + 1) * s.chunk : s.count), o(j / s.inner),
        i(j - o * s.inner), step(threads * width), step_o(step / s.inner),
        step_i(step % s.inner), width(width) {}

  VGGBENCH_HD bool valid() const { return j < end; }
  VGGBENCH_HD int lanes() const { return end - j < width ? static_cast<int>(end - j) : width; }
  // The offset of the visit's first element.
  VGGBENCH_HD int64_t offset() const { return (o * channels + c) * inner + i; }
  // The offset of lane k (lane 0: offset()), stepping lane by lane (k < width): a lane past
  // the end of a row starts the next row of channel c (when inner % width != 0).
  VGGBENCH_HD int64_t lane_offset(int k) const {
    int64_t lane = offset(), lane_i = i;
    for (int m = 0; m < k; ++m) {
      ++lane;
      if (++lane_i == inner) lane_i = 0, lane += (channels - 1) * inner;
    }
    return lane;
  }
  VGGBENCH_HD void advance() {
    j += step;
    i += step_i, o += step_o;
    if (i >= inner) i -= inner, ++o;
  }
};

// ---- Elementwise passes: a grid-stride loop over the flat index ---------------------------

// Blocks of an elementwise pass: a visit per thread where that takes at most kMaxBlocks,
// else a grid-stride loop. A flat index's channel repeats with period channels * inner;
// where it fits, the stride (blocks * kThreads * width) is a multiple of that period, so a
// thread's visits all start on one channel and it computes its per-channel coefficients once.
inline int64_t elementwise_blocks(int64_t outer, int64_t channels, int64_t inner, int width = 1) {
  const int64_t per_block = int64_t{kThreads} * width;
  const int64_t blocks = ceil_div(outer * channels * inner, per_block);
  if (blocks <= kMaxBlocks) return blocks;
  const int64_t period = channels * inner;
  // the fewest blocks whose threads span whole periods
  const int64_t unit = period / std::gcd(period, per_block);
  return unit <= kMaxBlocks ? kMaxBlocks / unit * unit : kMaxBlocks;
}

// The channel (idx / inner) % channels of a grid-stride index, kept up to date as idx
// advances by `stride`: two divisions per thread rather than per element.
struct ChannelCursor {
  int64_t inner, channels, i, c, step_i, step_c;

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

  // The channel of idx + k (lane 0: c), stepping lane by lane (k < width).
  VGGBENCH_HD int64_t lane_channel(int k) const {
    int64_t lane_c = c, lane_i = i;
    for (int m = 0; m < k; ++m) {
      if (++lane_i != inner) continue;
      lane_i = 0;
      if (++lane_c == channels) lane_c = 0;  // the next row is the next channel's
    }
    return lane_c;
  }
};

// Thread `thread` of block `block` in a grid of `blocks` blocks of `threads`: visits start at
// index = (block * threads + thread) * width, then every blocks * threads * width, while
// below numel; channel.c is the channel of a visit's first element.
struct ElementCursor {
  int64_t numel, index, stride;
  ChannelCursor channel;
  int width;

  VGGBENCH_HD ElementCursor(int64_t numel, int64_t channels, int64_t inner, int64_t block,
                            int64_t thread, int64_t blocks, int64_t threads, int width = 1)
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
