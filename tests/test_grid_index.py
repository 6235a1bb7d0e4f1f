"""The CUDA passes' grid partitioning (csrc/cuda/grid_index.h), checked on the CPU.

torch.ops.vggbench._grid_coverage_reduction / _elementwise run every (block, thread) of a
grid through the same __host__ __device__ functions the kernels call, and record what each
element and partial slot receives. Every element must be visited exactly once, by a lane that
takes it for its own channel (elementwise: applies its own channel's coefficients) and sums it
into its own channel's slot; every block's partial sums must land in slots of their own, and
each tile's last block must read each of its slots once, within the block's threads and shared
buffer; for both layouts (NCHW is (outer, C, inner) = (N, C, H * W), NHWC (N * H * W, C, 1)) and
every visit width.
"""

from __future__ import annotations

import math

import pytest
import torch

from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.bench.scaling import torch_threads

CHANNELS = (1, 3, 17, 32, 33, 64, 100, 255, 256, 512, 600)
SPATIAL = (1, 7 * 7, 14 * 14, 28 * 28, 32 * 32)  # H * W
# the widest visit (elements per 16-byte vector) of scalar loads (1, or pointers not aligned
# to 16 bytes), float64, float32, bfloat16/float16: the kernels narrow it to the layout
MAX_WIDTHS = (1, 2, 4, 8)
MAX_PARTS = 128  # blocks per channel tile of a reduction (kMaxParts)
MIN_BLOCKS, MAX_BLOCKS = 256, 4096  # an elementwise grid's blocks (kMinBlocks, kMaxBlocks)
VISITS_PER_THREAD = 8  # an elementwise thread's visits where there are enough (kVisitsPerThread)


@pytest.fixture(autouse=True)
def one_thread():
    # thousands of small checks: parallel regions would cost more in synchronisation than
    # they save, the more so on a shared machine
    with torch_threads(1):
        yield


def geometry(layout: str, n: int, c: int, hw: int) -> tuple[int, int, int]:
    """(outer, channels, inner) of an (N, C, H, W) tensor in `layout`."""
    return (n, c, hw) if layout == "nchw" else (n * hw, c, 1)


def channel_of(outer: int, channels: int, inner: int) -> torch.Tensor:
    """The channel of every element of an (outer, channels, inner) tensor."""
    return torch.arange(channels, dtype=torch.int32).view(1, channels, 1).expand(outer, channels, inner)


def check_reduction(outer: int, channels: int, inner: int, max_width: int, sums: int = 2) -> tuple[int, int]:
    """Asserts the reduction grid's coverage; returns its parts per channel and its width."""
    shape = (outer, channels, inner, max_width)
    hits, channel, slot_channel, part, slot_hits, finish_reads, width = (
        torch.ops.vggbench._grid_coverage_reduction(*shape, sums))
    assert torch.equal(hits, torch.ones_like(hits)), f"{shape}: elements not visited exactly once"
    assert torch.equal(channel, channel_of(outer, channels, inner)), f"{shape}: wrong lane channel"
    assert torch.equal(slot_channel, channel), f"{shape}: summed into another channel's slot"
    assert width in (1, max_width)
    parts = slot_hits.shape[1]
    assert 1 <= parts <= MAX_PARTS
    # part p of every channel is the same run of j = o * inner + i: consecutive, in order,
    # none empty, all of one size (a multiple of the width along rows) but the last
    by_j = part.transpose(0, 1).reshape(channels, outer * inner)
    assert torch.equal(by_j, by_j[:1].expand_as(by_j)), f"{shape}: channels split differently"
    assert bool((by_j[0].diff() >= 0).all()), f"{shape}: parts out of order"
    sizes = torch.bincount(by_j[0], minlength=parts)
    assert sizes.numel() == parts and bool((sizes > 0).all()), f"{shape}: part sizes {sizes}"
    if parts > 1:
        chunk = int(sizes[0])
        assert chunk % (width if inner > 1 else 1) == 0
        assert bool((sizes[:-1] == chunk).all()) and sizes[-1] <= chunk
    assert torch.equal(slot_hits, torch.ones_like(slot_hits)), f"{shape}: partial slots shared or unwritten"
    assert torch.equal(finish_reads, torch.ones_like(finish_reads)), f"{shape}: the finish misses or rereads slots"
    return parts, width


def check_elementwise(outer: int, channels: int, inner: int, max_width: int, blocks: int = -1) -> tuple[int, int, int]:
    """Asserts the elementwise grid's coverage; returns its blocks, channel changes and width."""
    shape = (outer, channels, inner, max_width, blocks)
    hits, channel, used, changes, width = torch.ops.vggbench._grid_coverage_elementwise(*shape)
    assert torch.equal(hits, torch.ones_like(hits)), f"{shape}: elements not visited exactly once"
    assert torch.equal(channel, channel_of(outer, channels, inner)), f"{shape}: wrong lane channel"
    assert used == blocks if blocks != -1 else 1 <= used <= MAX_BLOCKS
    assert width in (1, max_width)
    return used, changes, width


@pytest.mark.parametrize("max_width", MAX_WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("check", [check_reduction, check_elementwise], ids=["reduction", "elementwise"])
def test_every_element_is_covered_once_with_its_channel(check, layout, max_width):
    for c in CHANNELS:
        for hw in SPATIAL:
            check(*geometry(layout, 2, c, hw), max_width)


@pytest.mark.parametrize(
    ("layout", "c", "hw", "max_width", "reduction_width", "elementwise_width"),
    [
        ("nhwc", 32, 32 * 32, 8, 8, 8),  # the study's channels: 16-byte vectors across channels
        ("nhwc", 32, 32 * 32, 4, 4, 4),
        ("nhwc", 33, 7 * 7, 4, 1, 1),  # odd channel counts: scalar
        ("nhwc", 3, 14 * 14, 2, 1, 1),
        ("nhwc", 600, 7 * 7, 8, 8, 8),
        ("nchw", 32, 28 * 28, 8, 8, 8),  # 784 = 98 vectors of 8
        ("nchw", 32, 14 * 14, 8, 1, 8),  # 196 = 24.5 vectors: reductions scalar, elementwise straddle rows
        ("nchw", 32, 14 * 14, 4, 4, 4),
        ("nchw", 5, 7 * 7, 8, 1, 8),
        ("nchw", 5, 2 * 2, 8, 1, 1),  # rows shorter than a vector: scalar
        ("nchw", 32, 32 * 32, 1, 1, 1),  # unaligned pointers: scalar
    ],
)
def test_widths_follow_the_layout(layout, c, hw, max_width, reduction_width, elementwise_width):
    shape = geometry(layout, 3, c, hw)
    assert check_reduction(*shape, max_width)[1] == reduction_width
    assert check_elementwise(*shape, max_width)[2] == elementwise_width


@pytest.mark.parametrize(
    ("layout", "n", "c", "hw", "max_width", "sums", "expected_parts"),
    [
        # NHWC, one tile of 32 channels: 102400 rows split as far as MAX_PARTS allows
        ("nhwc", 100, 32, 32 * 32, 4, 2, MAX_PARTS),
        ("nhwc", 100, 32, 32 * 32, 8, 8, MAX_PARTS),
        # 3 channels (scalar, 4 threads across), 41 * 7 * 7 = 2009 rows: 64 rows at a time, 4
        # visits each -> 8 parts of 252 rows, the last 245
        ("nhwc", 41, 3, 7 * 7, 8, 2, 8),
        # 512 channels in 2 tiles of 256 (bfloat16): 4900 rows, 8 at a time -> 154 parts wanted,
        # MAX_PARTS allowed: parts of 39 rows, 126 of them cover the rows
        ("nhwc", 100, 512, 7 * 7, 8, 2, 126),
        # NCHW, 32 channels (at most 1024 / 32 parts each): 102400 positions, 256 vectors of 4
        # at a time, 4 visits each -> 25 parts of 4096
        ("nchw", 100, 32, 32 * 32, 4, 2, 25),
        # 7 channels of 21 * 196 = 4116 positions, scalar: 4 visits of 256 threads -> 5 parts, the last short
        ("nchw", 21, 7, 14 * 14, 8, 5, 5),
        # 255 channels of 7 * 7: at most 5 parts (1024 / 255 blocks rounded up); 4900 positions -> 5
        ("nchw", 100, 255, 7 * 7, 4, 8, 5),
        # one short channel: one part
        ("nchw", 2, 1, 7 * 7, 4, 2, 1),
    ],
)
def test_channels_split_into_parts_with_a_tail(layout, n, c, hw, max_width, sums, expected_parts):
    assert check_reduction(*geometry(layout, n, c, hw), max_width, sums=sums)[0] == expected_parts


@pytest.mark.parametrize("max_width", MAX_WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("blocks", [1, 3, 7, 61])
def test_small_grids_loop_over_every_element(layout, max_width, blocks):
    for c, hw in [(1, 7 * 7), (17, 14 * 14), (100, 28 * 28), (32, 7 * 7)]:
        check_elementwise(*geometry(layout, 2, c, hw), max_width, blocks)


@pytest.mark.parametrize("max_width", MAX_WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_looping_grid_keeps_each_thread_on_one_channel_at_the_study_shape(layout, max_width):
    # batch 100, 32 channels, 32x32: a thread loops over about VISITS_PER_THREAD visits (at
    # least MIN_BLOCKS blocks), all on the channels of its first, so it computes its lanes'
    # coefficients once
    numel = 100 * 32 * 32 * 32
    blocks, changes, width = check_elementwise(*geometry(layout, 100, 32, 32 * 32), max_width)
    assert changes == 0 and blocks >= MIN_BLOCKS
    assert VISITS_PER_THREAD / 2 <= numel / (blocks * 256 * width) <= VISITS_PER_THREAD * 2


def test_small_tensors_take_a_visit_per_thread():
    # 2 x 32 x 7 x 7 = 3136 elements: 13 blocks of one visit per thread, not 2 of 8
    blocks, _, width = check_elementwise(*geometry("nchw", 2, 32, 7 * 7), 1)
    assert (blocks, width) == (13, 1)


def test_looping_grid_covers_channels_whose_period_does_not_fit():
    # 255 channels of 7x7 repeat every 12495 elements, coprime to a block's 256: no grid of at
    # most MAX_BLOCKS blocks spans whole periods, so threads change channel as they loop
    blocks, changes, _ = check_elementwise(*geometry("nchw", 100, 255, 7 * 7), 1)
    assert blocks == math.ceil(100 * 255 * 49 / (256 * VISITS_PER_THREAD)) and changes > 0


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("_grid_coverage_reduction", (2, 0, 4, 1, 2), "must be positive"),
        ("_grid_coverage_reduction", (2, 3, 4, 1, 0), "sums must be 1 to 8"),
        ("_grid_coverage_reduction", (2, 3, 4, 1, 9), "sums must be 1 to 8"),
        ("_grid_coverage_elementwise", (2, 3, 4, 0, -1), "max_width must be 1, 2, 4, 8 or 16"),
        ("_grid_coverage_reduction", (2, 3, 4, 3, 2), "max_width must be 1, 2, 4, 8 or 16"),
        ("_grid_coverage_elementwise", (2, 3, 4, 1, 0), "blocks must be positive or -1"),
        ("_grid_coverage_elementwise", (1 << 14, 1 << 14, 1, 1, -1), "at most"),
    ],
)
def test_bad_arguments_are_refused(op, args, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.vggbench, op)(*args)


def test_a_tile_wider_than_the_block_is_caught():
    # visits of 16 one-byte lanes (no dtype the kernels take) would make NHWC tiles of 32 * 16
    # channels, more than a block's 256 threads store and finish: the check the kernels'
    # widths pass is live
    with pytest.raises(RuntimeError, match="more than the block's 256 threads"):
        torch.ops.vggbench._grid_coverage_reduction(2, 512, 1, 16, 2)
    check_reduction(2, 256, 1, 16)


def test_cuda_test_shapes_reach_what_they_are_there_for():
    # tests/test_cuda.py's SHAPES are chosen for what the grid does with them, which only a GPU
    # runs: check here that the grid still does it (the heuristics may change under them)
    from tests.test_cuda import SHAPES

    reached = set()
    for dtype, shape in SHAPES.values():
        hw = shape["size"] ** 2  # 3x3 convs with padding 1: the output keeps the input's size
        layout = "nhwc" if shape.get("layout") == "channels_last" else "nchw"
        outer, channels, inner = geometry(layout, shape["n"], shape["k"], hw)
        max_width = 16 // dtype.itemsize
        parts, width = check_reduction(outer, channels, inner, max_width)
        blocks, changes, lanes = check_elementwise(outer, channels, inner, max_width)
        tile = min(32, 2 ** math.ceil(math.log2(channels // width))) * width if layout == "nhwc" else 1
        reached |= {
            (layout, "uneven last part") if outer * inner % math.ceil(outer * inner / parts) else None,
            (layout, "vector reduction") if width > 1 else None,
            (layout, "scalar reduction") if width == 1 else None,
            ("nhwc", "several tiles, the last partial")
            if layout == "nhwc" and channels > tile and channels % tile else None,
            ("nhwc", "idle threads in a tile") if layout == "nhwc" and channels < tile else None,
            ("nchw", "threads change channel in the loop") if changes and layout == "nchw" else None,
            ("nchw", f"{dtype.itemsize}-byte visits straddle rows") if lanes > 1 and inner % lanes else None,
            (layout, "grid-stride loop") if outer * channels * inner > blocks * 256 * lanes else None,
            (layout, "one visit per thread") if outer * channels * inner <= blocks * 256 * lanes else None,
            (layout, "most parts") if parts == MAX_PARTS else None,
        }
    wanted = {(layout, what) for layout in ("nchw", "nhwc") for what in (
        "uneven last part", "vector reduction", "scalar reduction", "grid-stride loop", "one visit per thread")}
    wanted |= {("nhwc", "several tiles, the last partial"), ("nhwc", "idle threads in a tile"), ("nhwc", "most parts"),
               ("nchw", "threads change channel in the loop"), ("nchw", "4-byte visits straddle rows"),
               ("nchw", "2-byte visits straddle rows")}
    assert wanted <= reached, wanted - reached
