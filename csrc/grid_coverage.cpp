// Internal ops for tests/test_grid_index.py: they run every (block, thread) of the CUDA
// passes' grids through cuda/grid_index.h on the CPU and record what each element and
// partial slot receives, so that the grid partitioning is checked without a GPU.
#include "cuda/grid_index.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace vggbench {
namespace {

using Tensor = at::Tensor;

// Enough for every shape the tests take, small enough for a test machine's memory.
constexpr int64_t kMaxElements = int64_t{1} << 26;

void check_geometry(int64_t outer, int64_t channels, int64_t inner, int64_t max_width) {
  TORCH_CHECK(outer > 0 && channels > 0 && inner > 0,
              "_grid_coverage: outer, channels and inner must be positive, got ", outer, ", ",
              channels, ", ", inner);
  TORCH_CHECK(max_width == 1 || max_width == 2 || max_width == 4 || max_width == 8 ||
                  max_width == 16,
              "_grid_coverage: max_width must be 1, 2, 4, 8 or 16 elements, got ", max_width);
  TORCH_CHECK(outer * channels * inner <= kMaxElements, "_grid_coverage: at most ",
              kMaxElements, " elements, got ", outer * channels * inner);
}

// Calls f(max_width) with max_width (checked) as a compile-time constant, as the kernels have
// their vector width.
template <typename F>
void with_max_width(int max_width, const F& f) {
  switch (max_width) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// Per element (outer, channels, inner): hits, the channel of the lane that visits it and of
// the block's slot its value is summed into (-1 if none), its part; slot_hits (sums, parts,
// channels): the blocks' writes of each partial slot; finish_reads (same shape): the reads of
// each slot by its tile's last block; the width.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int64_t> reduction_coverage(
    int64_t outer, int64_t channels, int64_t inner, int64_t max_width, int64_t sums) {
  check_geometry(outer, channels, inner, max_width);
  TORCH_CHECK(sums > 0 && sums <= grid::kWarps, "_grid_coverage_reduction: sums must be 1 to ",
              grid::kWarps, ", got ", sums);
  const grid::Reduction s =
      grid::reduction_of(outer, channels, inner, static_cast<int>(max_width));
  const auto options = at::TensorOptions().dtype(at::kInt);
  Tensor hits = at::zeros({outer, channels, inner}, options);
  Tensor channel = at::full({outer, channels, inner}, -1, options);
  Tensor slot_channel = at::full({outer, channels, inner}, -1, options);
  Tensor part = at::full({outer, channels, inner}, -1, options);
  Tensor slot_hits = at::zeros({sums, s.parts, channels}, options);
  Tensor finish_reads = at::zeros({sums, s.parts, channels}, options);
  int32_t *hit = hits.data_ptr<int32_t>(), *chan = channel.data_ptr<int32_t>(),
          *slot_chan = slot_channel.data_ptr<int32_t>(), *prt = part.data_ptr<int32_t>(),
          *slot = slot_hits.data_ptr<int32_t>(), *reads = finish_reads.data_ptr<int32_t>();
  const auto slot_index = [&](int64_t w, int64_t p, int64_t c, const char* who) {
    const int64_t k = s.partial_slot(static_cast<int>(w), p, c);
    TORCH_CHECK(k >= 0 && k < slot_hits.numel(), "_grid_coverage_reduction: ", who,
                " partial slot ", k, " out of bounds");
    return k;
  };
  // the kernel's shared buffer: a warp's slots, then the finish's tasks
  const int warp_slots = grid::kWarpSize * s.width;
  // block (tile, part) = (blockIdx.x, blockIdx.y), as fused_unit_kernel.cu launches it
  for (int64_t t = 0; t < s.tiles; ++t) {
    const int64_t n = s.tile_channels(t);
    // threads 0 .. n - 1 store the block's sums and write the finished channels
    TORCH_CHECK(n <= grid::kThreads, "_grid_coverage_reduction: tile ", t, " has ", n,
                " channels, more than the block's ", grid::kThreads, " threads");
    for (int64_t p = 0; p < s.parts; ++p) {
      for (int thread = 0; thread < grid::kThreads; ++thread) {
        for (grid::SliceCursor cur(s, t, p, thread); cur.valid(); cur.advance()) {
          for (int k = 0; k < s.width; ++k) {
            const int64_t offset = cur.offset() + k;
            TORCH_CHECK(offset >= 0 && offset < hits.numel(), "_grid_coverage_reduction: block (",
                        t, ", ", p, ") thread ", thread, " visits offset ", offset,
                        " out of bounds");
            const int sl = s.slot_of(thread % s.tx, k);
            TORCH_CHECK(sl < warp_slots, "_grid_coverage_reduction: slot ", sl,
                        " past a warp's row of the shared buffer");
            ++hit[offset], prt[offset] = static_cast<int32_t>(p);
            chan[offset] = static_cast<int32_t>(cur.lane_channel(k));
            slot_chan[offset] = sl < n ? static_cast<int32_t>(s.slot_channel(t, sl)) : -2;
          }
        }
        for (int64_t w = 0; w < sums && thread < n; ++w) {
          ++slot[slot_index(w, p, s.slot_channel(t, thread), "block")];
        }
      }
    }
    // the tile's last block: every task of the finish
    const grid::Finish f(static_cast<int>(sums), n);
    TORCH_CHECK((f.groups == 1 || f.tasks() <= grid::kThreads) &&
                    f.tasks() <= grid::shared_sums(s.width),
                "_grid_coverage_reduction: finish tasks exceed the block or its shared buffer");
    for (int q = 0; q < f.tasks(); ++q) {
      for (int64_t p = f.first_part(q); p < s.parts; p += f.groups) {
        ++reads[slot_index(f.sum_of(q), p, s.slot_channel(t, f.slot_of(q)), "finish")];
      }
    }
  }
  return {hits, channel, slot_channel, part, slot_hits, finish_reads, s.width};
}

// hits and channel (that of the coefficients the visiting thread takes for the lane) of
// every element, (outer, channels, inner); the grid's blocks (`blocks`, or with -1 the passes' own grid);
// how often a thread's channel changed between its visits, over all threads; the width.
std::tuple<Tensor, Tensor, int64_t, int64_t, int64_t> elementwise_coverage(
    int64_t outer, int64_t channels, int64_t inner, int64_t max_width, int64_t blocks) {
  check_geometry(outer, channels, inner, max_width);
  TORCH_CHECK(blocks > 0 || blocks == -1,
              "_grid_coverage_elementwise: blocks must be positive or -1 (the passes' grid), got ",
              blocks);
  const int w = grid::elementwise_width(channels, inner, static_cast<int>(max_width));
  if (blocks == -1) blocks = grid::elementwise_blocks(outer, channels, inner, w);
  const int64_t numel = outer * channels * inner;
  const auto options = at::TensorOptions().dtype(at::kInt);
  Tensor hits = at::zeros({outer, channels, inner}, options);
  Tensor channel = at::full({outer, channels, inner}, -1, options);
  int32_t *hit = hits.data_ptr<int32_t>(), *chan = channel.data_ptr<int32_t>();
  int64_t changes = 0;
  // the kernels' visit for this width; each lane's channel is the one whose coefficients
  // the thread's LaneCoefficients hands it (per_channel: the channel itself)
  with_max_width(static_cast<int>(max_width), [&](auto vector) {
    grid::with_visit<decltype(vector)::value>(w, inner, [&](auto lanes, auto across) {
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t t = 0; t < grid::kThreads; ++t) {
          grid::LaneCoefficients<int64_t, decltype(lanes)::value, decltype(across)::value> co;
          grid::ElementCursor cur(numel, channels, inner, b, t, blocks, grid::kThreads, w);
          for (int64_t previous = cur.channel.c; cur.valid(); cur.advance()) {
            changes += cur.channel.c != previous, previous = cur.channel.c;
            co.update(cur.channel, [](int64_t c) { return c; });
            for (int k = 0; k < cur.lanes(); ++k) {
              const int64_t index = cur.index + k;
              TORCH_CHECK(index >= 0 && index < numel, "_grid_coverage_elementwise: block ", b,
                          " thread ", t, " visits index ", index, " out of bounds");
              ++hit[index], chan[index] = static_cast<int32_t>(co.of(cur.channel, k));
            }
          }
        }
      }
    });
  });
  return {hits, channel, blocks, changes, w};
}

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_FRAGMENT(vggbench, m) {
  // The CUDA reductions' partitioning (cuda/grid_index.h) for an (outer, channels, inner)
  // tensor, visits of at most `max_width` elements, `sums` sums per channel: (hits, channel,
  // slot_channel, part) per element (visits; the channel its lane takes it for and the
  // channel of the block's slot it is summed into, -1 if none, -2 for a slot past the tile;
  // its part), slot_hits and finish_reads (sums, parts, channels): the blocks' writes and the
  // finishing blocks' reads of each partial slot, and the width.
  m.def("_grid_coverage_reduction(int outer, int channels, int inner, int max_width, int sums)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int)",
        &vggbench::reduction_coverage);
  // The CUDA elementwise passes' grid-stride loop over the same tensor, with `blocks`
  // blocks (-1: the passes' own grid): (hits, channel) per element (channel: that of the
  // coefficients the visiting thread takes for the lane, -1 if none), the blocks, the
  // channel changes between a thread's visits summed over threads (per-channel
  // coefficients recomputed), and the width.
  m.def("_grid_coverage_elementwise(int outer, int channels, int inner, int max_width, int blocks)"
        " -> (Tensor, Tensor, int, int, int)",
        &vggbench::elementwise_coverage);
}
