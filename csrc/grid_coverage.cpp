// Internal ops for tests/test_grid_index.py: they run every (block, thread) of the CUDA
// passes' grids through cuda/grid_index.h on the CPU and record what each element and
// partial slot receives, so that the grid partitioning is checked without a GPU.
#include "cuda/grid_index.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace vggbench {
namespace {

using Tensor = at::Tensor;

// Enough for every shape the tests take, small enough for a test machine's memory.
constexpr int64_t kMaxElements = int64_t{1} << 26;

void check_geometry(int64_t outer, int64_t channels, int64_t inner, int64_t width) {
  TORCH_CHECK(outer > 0 && channels > 0 && inner > 0,
              "_grid_coverage: outer, channels and inner must be positive, got ", outer, ", ",
              channels, ", ", inner);
  TORCH_CHECK(width >= 1 && width <= 16, "_grid_coverage: width must be 1 to 16 elements, got ",
              width);
  TORCH_CHECK(outer * channels * inner <= kMaxElements, "_grid_coverage: at most ",
              kMaxElements, " elements, got ", outer * channels * inner);
}

// hits, channel and part of every element, (outer, channels, inner); slot_hits (sums,
// channels, parts): the writes each partial slot receives.
std::tuple<Tensor, Tensor, Tensor, Tensor> reduction_coverage(int64_t outer, int64_t channels,
                                                              int64_t inner, int64_t width,
                                                              int64_t sums) {
  check_geometry(outer, channels, inner, width);
  TORCH_CHECK(sums > 0, "_grid_coverage_reduction: sums must be positive, got ", sums);
  const grid::Split s = grid::split_of(outer, channels, inner, static_cast<int>(width));
  const auto options = at::TensorOptions().dtype(at::kInt);
  Tensor hits = at::zeros({outer, channels, inner}, options);
  Tensor channel = at::full({outer, channels, inner}, -1, options);
  Tensor part = at::full({outer, channels, inner}, -1, options);
  Tensor slot_hits = at::zeros({sums, channels, s.parts}, options);
  int32_t *hit = hits.data_ptr<int32_t>(), *chan = channel.data_ptr<int32_t>(),
          *prt = part.data_ptr<int32_t>(), *slot = slot_hits.data_ptr<int32_t>();
  // block (c, p) = (blockIdx.x, blockIdx.y), as fused_unit_kernel.cu launches it
  for (int64_t p = 0; p < s.parts; ++p) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t t = 0; t < grid::kThreads; ++t) {
        grid::SliceCursor cur(s, c, p, t, grid::kThreads, static_cast<int>(width));
        for (; cur.valid(); cur.advance()) {
          for (int k = 0; k < cur.lanes(); ++k) {
            const int64_t offset = cur.lane_offset(k);
            TORCH_CHECK(offset >= 0 && offset < hits.numel(), "_grid_coverage_reduction: block (",
                        c, ", ", p, ") thread ", t, " visits offset ", offset, " out of bounds");
            ++hit[offset];
            chan[offset] = static_cast<int32_t>(c), prt[offset] = static_cast<int32_t>(p);
          }
        }
      }
      for (int w = 0; w < sums; ++w) {
        const int64_t k = grid::partial_slot(s, w, c, p);
        TORCH_CHECK(k >= 0 && k < slot_hits.numel(), "_grid_coverage_reduction: block (", c,
                    ", ", p, ") writes partial slot ", k, " out of bounds");
        ++slot[k];
      }
    }
  }
  return {hits, channel, part, slot_hits};
}

// hits and channel (as the thread's cursor sees it) of every element, (outer, channels,
// inner); the grid's blocks (`blocks`, or with -1 the passes' own grid); how often a
// thread's channel changed between its visits, over all threads.
std::tuple<Tensor, Tensor, int64_t, int64_t> elementwise_coverage(int64_t outer,
                                                                  int64_t channels,
                                                                  int64_t inner, int64_t width,
                                                                  int64_t blocks) {
  check_geometry(outer, channels, inner, width);
  TORCH_CHECK(blocks > 0 || blocks == -1,
              "_grid_coverage_elementwise: blocks must be positive or -1 (the passes' grid), got ",
              blocks);
  const int w = static_cast<int>(width);
  if (blocks == -1) blocks = grid::elementwise_blocks(outer, channels, inner, w);
  const int64_t numel = outer * channels * inner;
  const auto options = at::TensorOptions().dtype(at::kInt);
  Tensor hits = at::zeros({outer, channels, inner}, options);
  Tensor channel = at::full({outer, channels, inner}, -1, options);
  int32_t *hit = hits.data_ptr<int32_t>(), *chan = channel.data_ptr<int32_t>();
  int64_t changes = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = 0; t < grid::kThreads; ++t) {
      grid::ElementCursor cur(numel, channels, inner, b, t, blocks, grid::kThreads, w);
      for (int64_t previous = cur.channel.c; cur.valid(); cur.advance()) {
        changes += cur.channel.c != previous, previous = cur.channel.c;
        for (int k = 0; k < cur.lanes(); ++k) {
          const int64_t index = cur.index + k;
          TORCH_CHECK(index >= 0 && index < numel, "_grid_coverage_elementwise: block ", b,
                      " thread ", t, " visits index ", index, " out of bounds");
          ++hit[index], chan[index] = static_cast<int32_t>(cur.channel.lane_channel(k));
        }
      }
    }
  }
  return {hits, channel, blocks, changes};
}

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_FRAGMENT(vggbench, m) {
  // The CUDA reductions' partitioning (cuda/grid_index.h) for an (outer, channels, inner)
  // tensor, visits of `width` elements, `sums` sums per channel: (hits, channel, part) per
  // element (how many visits it got; the channel and part of the last block that visited
  // it, -1 if none) and slot_hits (sums, channels, parts), the writes of each partial slot.
  m.def("_grid_coverage_reduction(int outer, int channels, int inner, int width, int sums)"
        " -> (Tensor, Tensor, Tensor, Tensor)",
        &vggbench::reduction_coverage);
  // The CUDA elementwise passes' grid-stride loop over the same tensor, with `blocks`
  // blocks (-1: the passes' own grid): (hits, channel) per element (channel: the visiting
  // thread's cursor's, -1 if none), the blocks, and the channel changes between a thread's
  // visits summed over threads (per-channel coefficients recomputed).
  m.def("_grid_coverage_elementwise(int outer, int channels, int inner, int width, int blocks)"
        " -> (Tensor, Tensor, int, int)",
        &vggbench::elementwise_coverage);
}
