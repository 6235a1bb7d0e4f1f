"""The CUDA passes' grid partitioning (csrc/cuda/grid_index.h), checked on the CPU.

torch.ops.vggbench._grid_coverage_reduction / _elementwise run every (block, thread) of a
grid through the same __host__ __device__ functions the kernels call, and record what each
element and partial slot receives. Every element must be visited exactly once, by a thread
that takes it for its own channel, and every block's partial sums must land in slots of their
own, for both layouts: NCHW is (outer, C, inner) = (N, C, H * W), NHWC (N * H * W, C, 1).
"""

from __future__ import annotations

import pytest
import torch

from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.bench.scaling import torch_threads

CHANNELS = (1, 3, 17, 32, 64, 100, 255, 256, 512, 600)
SPATIAL = (1, 7 * 7, 14 * 14, 28 * 28, 32 * 32)  # H * W
# elements per visit: 1 for scalar loads, else a 16-byte vector of float64, float32, or
# bfloat16/float16
WIDTHS = (1, 2, 4, 8)
MAX_PARTS = 128  # the finish of a channel stages its parts in a buffer of this many (kMaxParts)
MAX_BLOCKS = 4096  # the elementwise passes' grid when they loop (kMaxBlocks)


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


def check_reduction(outer: int, channels: int, inner: int, width: int, sums: int = 2) -> int:
    """Asserts the reduction grid's coverage; returns its parts per channel."""
    shape = (outer, channels, inner, width)
    hits, channel, part, slot_hits = torch.ops.vggbench._grid_coverage_reduction(*shape, sums)
    assert torch.equal(hits, torch.ones_like(hits)), f"{shape}: elements not visited exactly once"
    assert torch.equal(channel, channel_of(outer, channels, inner)), f"{shape}: wrong channel"
    parts = slot_hits.shape[2]
    assert 1 <= parts <= MAX_PARTS
    # part p of every channel is the same run of j = o * inner + i: consecutive, in order,
    # none empty, all of one size (a multiple of the width) but the last
    by_j = part.transpose(0, 1).reshape(channels, outer * inner)
    assert torch.equal(by_j, by_j[:1].expand_as(by_j)), f"{shape}: channels split differently"
    assert bool((by_j[0].diff() >= 0).all()), f"{shape}: parts out of order"
    sizes = torch.bincount(by_j[0], minlength=parts)
    assert sizes.numel() == parts and bool((sizes > 0).all()), f"{shape}: part sizes {sizes}"
    if parts > 1:
        chunk = int(sizes[0])
        assert chunk % width == 0 and bool((sizes[:-1] == chunk).all()) and sizes[-1] <= chunk
    assert torch.equal(slot_hits, torch.ones_like(slot_hits)), f"{shape}: partial slots shared"
    return parts


def check_elementwise(outer: int, channels: int, inner: int, width: int, blocks: int = -1) -> tuple[int, int]:
    """Asserts the elementwise grid's coverage; returns its blocks and channel changes."""
    shape = (outer, channels, inner, width, blocks)
    hits, channel, used, changes = torch.ops.vggbench._grid_coverage_elementwise(*shape)
    assert torch.equal(hits, torch.ones_like(hits)), f"{shape}: elements not visited exactly once"
    assert torch.equal(channel, channel_of(outer, channels, inner)), f"{shape}: wrong channel"
    assert used == blocks if blocks != -1 else 1 <= used <= MAX_BLOCKS
    return used, changes


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("check", [check_reduction, check_elementwise], ids=["reduction", "elementwise"])
def test_every_element_is_covered_once_with_its_channel(check, layout, width):
    for c in CHANNELS:
        for hw in SPATIAL:
            check(*geometry(layout, 2, c, hw), width)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("n", "c", "hw", "expected_parts"),
    [
        (40, 5, 7 * 7, 2),  # threads step over rows of 49 a few times
        (21, 7, 14 * 14, 5),  # parts of 824 across rows of 196, an uneven last part
        (100, 3, 32 * 32, 100),  # the study's batch: parts of 1024, as many as elements allow
        (130, 2, 28 * 28, 100),  # an uneven last part
        (201, 2, 28 * 28, MAX_PARTS),  # more than MAX_PARTS parts' worth: longer parts
    ],
)
def test_long_channels_split_into_parts_with_a_tail(layout, width, n, c, hw, expected_parts):
    assert check_reduction(*geometry(layout, n, c, hw), width, sums=5) == expected_parts


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("blocks", [1, 3, 7, 61])
def test_small_grids_loop_over_every_element(layout, width, blocks):
    for c, hw in [(1, 7 * 7), (17, 14 * 14), (100, 28 * 28)]:
        check_elementwise(*geometry(layout, 2, c, hw), width, blocks)


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_looping_grid_keeps_each_thread_on_one_channel_at_the_study_shape(layout, width):
    # batch 100, 32 channels, 32x32: more visits than MAX_BLOCKS blocks take at once
    blocks, changes = check_elementwise(*geometry(layout, 100, 32, 32 * 32), width)
    assert blocks * 256 * width < 100 * 32 * 32 * 32 and changes == 0


def test_looping_grid_covers_channels_whose_period_does_not_fit():
    # 255 channels of 7x7 repeat every 12495 elements, coprime to a block's 256: threads
    # change channel as they loop
    blocks, changes = check_elementwise(*geometry("nchw", 100, 255, 7 * 7), 1)
    assert blocks == MAX_BLOCKS and changes > 0


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("_grid_coverage_reduction", (2, 0, 4, 1, 2), "must be positive"),
        ("_grid_coverage_reduction", (2, 3, 4, 1, 0), "sums must be positive"),
        ("_grid_coverage_elementwise", (2, 3, 4, 0, -1), "width must be 1 to 16"),
        ("_grid_coverage_reduction", (2, 3, 4, 32, 2), "width must be 1 to 16"),
        ("_grid_coverage_elementwise", (2, 3, 4, 1, 0), "blocks must be positive or -1"),
        ("_grid_coverage_elementwise", (1 << 14, 1 << 14, 1, 1, -1), "at most"),
    ],
)
def test_bad_arguments_are_refused(op, args, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.vggbench, op)(*args)
