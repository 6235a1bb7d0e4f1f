"""What only a GPU shows: the fused op's CUDA path inside models, compiled, captured in a
CUDA graph, free of host syncs, on other devices and streams, at shapes that exercise the
kernels' grid partitioning, and bit-for-bit repeatable.

Every test is marked `cuda` (skipped without a GPU, tests/conftest.py; scripts/gpu_check.sh
runs `pytest -m cuda`). Tolerances come from native PyTorch's own error against float64
(tests/test_ops.py: assert_matches_native, tests/helpers.py: assert_fused_trains_like_native).
cuDNN runs IEEE float32 (no TF32) and, as several tests assert bitwise equality of results
that include its backward, its deterministic algorithms.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_fused_trains_like_native, cudnn_flags, without_timing
from tests.test_ops import BAD_INPUTS, BN_BUFFERS, Sample, assert_matches_native, make_sample
from vggbench import ops
from vggbench.bench.model_cases import ModelBench, ModelCase
from vggbench.bench.timing import count_host_syncs
from vggbench.config import TrainConfig
from vggbench.device import configure_determinism
from vggbench.graphs import WARMUP_STEPS
from vggbench.models import build_model, unit_for
from vggbench.models.vgg import ProcessingBlock
from vggbench.train import Trainer, build_parser

pytestmark = pytest.mark.cuda
SMALL_GAMMAS = [0.0, 1e-9, 1e-3, 0.8, -1.3, 0.6, -0.9, 1.1]  # exactly and nearly 0: the recompute fallback


@pytest.fixture(autouse=True)
def deterministic_ieee_cudnn():
    with cudnn_flags(deterministic=True):
        yield


@pytest.fixture(params=["all", "rule", "keep"])
def recompute(request, monkeypatch) -> str:
    """The backward policy: "all" (CUDA's default, no host read), "rule" (per-channel recovery),
    "keep" (the forward keeps the conv output)."""
    monkeypatch.setattr(ops, "RECOMPUTE", request.param)
    return request.param


def gammas(k: int) -> list[float]:
    return (SMALL_GAMMAS * (k // len(SMALL_GAMMAS) + 1))[:k]


def study_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, autocast: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """One training step as the study runs it on a GPU (bf16 autocast unless told otherwise; no
    autocast cache, which CUDA graph capture forbids); returns the loss without reading it."""
    with torch.autocast("cuda", autocast, enabled=autocast is not None, cache_enabled=False):
        loss = F.cross_entropy(model(images).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def study_model(filters: int = 16) -> torch.nn.Module:
    """Fused VGG08 BN+RC with a projection shortcut, channels_last on cuda."""
    torch.manual_seed(0)
    model = build_model("vgg08", "bn_rc", filters=filters, impl="fused", residual_reduction=True)
    return model.cuda().to(memory_format=torch.channels_last)


def batches(count: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 3, 32, 32, generator=gen).cuda().contiguous(memory_format=torch.channels_last),
             torch.randint(0, 100, (n,), generator=gen).cuda()) for _ in range(count)]


# --- models ------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "autocast"), [
    (torch.contiguous_format, None), (torch.channels_last, None), (torch.channels_last, torch.bfloat16),
], ids=["float32-contiguous", "float32-channels_last", "bf16-autocast-channels_last"])
def test_vgg38_bn_rc_trains_like_native(layout, autocast):
    """Four Adam steps of fused VGG38 BN+RC stay as close to the float64 run as native does."""
    assert_fused_trains_like_native("cuda", layout, autocast)


def test_compile_fullgraph():
    """A residual block of fused units compiles on CUDA with no graph break (channels_last, bf16
    autocast) and trains like eager: the same kernels run, only the glue around them is compiled."""
    torch.manual_seed(0)
    unit = unit_for("fused")
    eager = ProcessingBlock([unit(16, 16) for _ in range(2)], residual=True).cuda()
    compiled_block = copy.deepcopy(eager)
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(8, 16, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            outs = [m(x) for m in (eager, compiled)]
        grads = [torch.autograd.grad(out.float().square().sum(), list(m.parameters()))
                 for out, m in zip(outs, (eager, compiled_block))]
        torch.testing.assert_close(outs[1], outs[0])
        torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(compiled_block.state_dict(), eager.state_dict())
    assert int(compiled_block.units[0].bn.num_batches_tracked) == 2


def test_cuda_graph_replays_training_steps(monkeypatch):
    """A whole training step (forward, backward, SGD step, BN buffers) captured in a CUDA graph
    and replayed on new batches trains as the same steps run eagerly. Warm-up runs on the
    capture stream: the reductions' per-stream counters must exist before capture. float32:
    cuBLAS may pick other algorithms on another stream, which float32 tolerances absorb."""
    monkeypatch.setattr(ops, "RECOMPUTE", "all")  # no host read in the backward
    graphed = study_model()
    eager = copy.deepcopy(graphed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (graphed, eager)]
    data = batches(6)
    images, labels = (t.clone() for t in data[0])  # the graph's static inputs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for batch in data[:3]:
            images.copy_(batch[0]), labels.copy_(batch[1])
            study_step(graphed, optimizers[0], images, labels, autocast=None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        loss = study_step(graphed, optimizers[0], images, labels, autocast=None)
    expected = [study_step(eager, optimizers[1], *batch, autocast=None).item() for batch in data]
    replayed = []
    for batch in data[3:]:
        images.copy_(batch[0]), labels.copy_(batch[1])
        graph.replay()
        replayed.append(loss.item())
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(expected[3:]))
    torch.testing.assert_close(graphed.state_dict(), eager.state_dict())
    tracked = [b for name, b in graphed.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 6 for b in tracked)


def test_steady_state_step_does_not_sync(monkeypatch):
    """With RECOMPUTE="all" a training step and an eval forward make no host sync
    (torch.cuda.set_sync_debug_mode("error") raises on any)."""
    monkeypatch.setattr(ops, "RECOMPUTE", "all")
    model = study_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (images, labels), = batches(1)
    for _ in range(2):  # warm-up: lazy state, counters, cuDNN plans
        study_step(model, optimizer, images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        study_step(model, optimizer, images, labels)
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        model.train()


# --- devices and streams --------------------------------------------------------------------
def test_second_device():
    """On cuda:1 while cuda:0 is current: the kernels run on the tensors' device and match native."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices ({torch.cuda.device_count()} visible)")
    sample = make_sample("cuda1", "cuda:1", torch.float32, True, n=4, c=16, k=32, size=12, bias=True,
                         residual=True, layout="channels_last")
    with torch.cuda.device(0):
        assert_matches_native(sample, sample.cast(torch.float64))


def run_op(sample: Sample) -> list[torch.Tensor]:
    """Output, batch statistics and every gradient of one training call (grad_output = output)."""
    out = ops.conv_bn_act(**sample.kwargs())
    grads = torch.autograd.grad(out, list(sample.grad_inputs().values()), out.detach())
    stats = torch.ops.vggbench.conv_bn_act(*sample.op_args())
    return [out, *stats[1:], *grads, *(getattr(sample, b) for b in BN_BUFFERS)]


def test_side_streams_run_concurrently():
    """Two calls in flight at once on two side streams (separate reduction counters) give
    bit for bit what each gives alone on the default stream."""
    samples = [make_sample(f"stream{i}", "cuda", torch.float32, True, n=16, c=32, k=64, size=24, bias=True,
                           residual=True, layout="channels_last") for i in range(2)]
    expected = [run_op(s) for s in copy.deepcopy(samples)]
    streams = [torch.cuda.Stream() for _ in samples]
    got = []
    for stream, sample in zip(streams, samples):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got.append(run_op(sample))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    for g, e in zip(got, expected):
        assert all(torch.equal(a, b) for a, b in zip(g, e))


# --- shapes that exercise the grid partitioning (csrc/cuda/grid_index.h) ----------------------
SHAPES = {  # label: (activation dtype, make_sample options)
    # channel reductions whose last part is shorter than the others (N*H*W = 9583); contiguous,
    # grid-stride threads that change channel as they loop (a stride of whole channel periods
    # of 48 * 37 * 37 elements would take 4107 blocks of 1024)
    "uneven-chunks": (torch.float32, dict(n=7, c=16, k=48, size=37)),
    "uneven-chunks-channels_last": (torch.float32, dict(n=7, c=16, k=48, size=37, layout="channels_last")),
    "uneven-chunks-channels_last-float16": (torch.float16, dict(n=7, c=16, k=48, size=37, layout="channels_last")),
    # contiguous outputs beyond one elementwise grid stride (a whole number of channel
    # periods: each thread stays on one channel); vectors of 4 (float32) or 8
    # (bfloat16/float16) along rows, straddling two channels where H*W is not a multiple
    # (7x7, 14x14 in bfloat16)
    "28x28-contiguous": (torch.float32, dict(n=64, c=32, k=64, size=28)),
    "28x28-contiguous-bfloat16": (torch.bfloat16, dict(n=64, c=32, k=64, size=28)),
    "14x14-contiguous": (torch.float32, dict(n=64, c=64, k=128, size=14)),
    "14x14-contiguous-bfloat16": (torch.bfloat16, dict(n=64, c=64, k=128, size=14)),
    "7x7-contiguous-float16": (torch.float16, dict(n=32, c=64, k=96, size=7)),
    "7x7-512-contiguous": (torch.float32, dict(n=64, c=128, k=512, size=7)),
    # channels_last: tiles of channels x rows; 512 channels in several tiles, many parts
    "7x7-512-channels_last": (torch.float32, dict(n=64, c=128, k=512, size=7, layout="channels_last")),
    "7x7-512-channels_last-bfloat16": (torch.bfloat16, dict(n=64, c=128, k=512, size=7, layout="channels_last")),
    "32x32-channels_last-bfloat16": (torch.bfloat16, dict(n=64, c=32, k=32, size=32, layout="channels_last")),
    # channel counts no vector divides: scalar loads across channels, idle threads in a tile
    # (3: 4 threads across), a second tile of one channel (33)
    "3-channels_last": (torch.float32, dict(n=16, c=8, k=3, size=20, layout="channels_last")),
    "33-channels_last-bfloat16": (torch.bfloat16, dict(n=16, c=8, k=33, size=20, layout="channels_last")),
    # 600 channels: 5 tiles of 128 (float32), the last of 88
    "600-channels_last": (torch.float32, dict(n=8, c=32, k=600, size=9, layout="channels_last")),
}


@pytest.mark.parametrize("label", list(SHAPES))
def test_large_shapes_match_native(label):
    """Training then eval calls (residual, conv bias) match native against float64 at shapes
    with many blocks per channel, uneven last parts, up to 600 channels, grid-stride loops, and
    vector visits across channels and along rows (tests/test_grid_index.py checks that the
    shapes still reach these)."""
    dtype, shape = SHAPES[label]
    sample = make_sample(label, "cuda", dtype, True, bias=True, residual=True, **shape)
    ref = sample.cast(torch.float64)
    assert_matches_native(sample, ref, seed=1)
    sample.training = ref.training = False
    assert_matches_native(sample, ref, seed=2)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t (contiguous or channels_last, as t) starting `offset` elements into a bigger
    buffer: the pointer a slice of a bigger tensor hands the op."""
    n, c, h, w = t.shape
    flat = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:]
    if t.is_contiguous():
        out = flat.view(n, c, h, w)
    else:
        out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("offset", [1, 8], ids=["misaligned", "aligned-slice"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_residual_at_any_storage_offset(dtype, layout, offset, recompute):
    """A residual one element past a 16-byte boundary (scalar loads in every pass that reads
    it), or 8 elements past it (16 bytes for bfloat16/float16: vector loads again), matches
    native, and the forward output is bit for bit the one of an aligned residual (the
    per-element maths is the same whatever the loads)."""
    sample = make_sample(f"offset-{layout}", "cuda", dtype, True, n=6, c=16, k=32, size=14, bias=True,
                         residual=True, layout=layout)
    aligned = ops.conv_bn_act(**copy.deepcopy(sample).kwargs()).detach()
    sample.residual = at_offset(sample.residual, offset)
    assert sample.residual.storage_offset() == offset
    assert_matches_native(sample, sample.cast(torch.float64))
    assert torch.equal(ops.conv_bn_act(**sample.kwargs()).detach(), aligned)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_recompute_matches_native(dtype, layout, recompute):
    """bf16/fp16 training with BN weights at and near 0 (recomputed channels) matches native."""
    sample = make_sample(f"lowp-{layout}", "cuda", dtype, True, n=8, c=24, k=40, size=13, bias=True,
                         residual=True, gamma=gammas(40), layout=layout)
    assert_matches_native(sample, sample.cast(torch.float64))


@pytest.mark.parametrize("n", [9, 32], ids=["few-parts", "many-parts"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reductions_repeat_bit_for_bit(dtype, layout, n, recompute):
    """The same training call twice gives identical outputs, statistics, gradients and buffers:
    the reductions combine their parts in a fixed order (cuDNN deterministic here), also with
    the most parts per tile, added by several threads per channel in the finish (n=32)."""
    sample = make_sample("repeat", "cuda", dtype, True, n=n, c=32, k=64, size=29, bias=True, residual=True,
                         gamma=gammas(64), layout=layout)
    first, second = (run_op(s) for s in (copy.deepcopy(sample), copy.deepcopy(sample)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [label for label in BAD_INPUTS if label != "float16-on-cpu"])
def test_bad_input_raises_on_cuda(label):
    """The CPU's checks hold on CUDA: a clear message, and the BN buffers untouched."""
    change, error, message = BAD_INPUTS[label]
    args = make_sample("bad", "cuda", residual=True, bias=True).kwargs()
    buffers = [args[name].clone() for name in BN_BUFFERS]
    with pytest.raises(error, match=message):
        ops.conv_bn_act(**{**args, **change(args)})
    for name, before in zip(BN_BUFFERS, buffers):
        assert torch.equal(args[name], before), name


SPLIT_BAD_INPUTS = {  # label: (change to _bn_act's valid arguments, distinctive part of the message)
    "bn_bias-on-cpu": (lambda a: {"bn_bias": a["bn_bias"].cpu()}, "bn_bias is on cpu but input is on cuda"),
    "bias-on-cpu": (lambda a: {"bias": a["bias"].cpu()}, "bias is on cpu but input is on cuda"),
    "residual-on-cpu": (lambda a: {"residual": a["residual"].cpu()}, "residual is on cpu but z is on cuda"),
    "mean-length": (lambda a: {"mean": a["mean"][:3]}, r"mean must have shape \(4,\)"),
}


@pytest.mark.parametrize("label", list(SPLIT_BAD_INPUTS))
def test_bad_input_to_split_ops_raises(label):
    """CPU tensors among CUDA ones, or statistics of the wrong length, in the synchronised-BN
    halves are named, not read as device memory."""
    sample = make_sample("split", "cuda", bias=True, residual=True)
    z, mean, var = torch.ops.vggbench._conv_stats(sample.input, sample.weight, sample.bias, 1, sample.padding)
    args = {"z": z, "mean": mean, "var": var, "bn_weight": sample.bn_weight, "bn_bias": sample.bn_bias,
            "bias": sample.bias, "residual": sample.residual, "eps": sample.eps, "slope": sample.negative_slope}
    change, message = SPLIT_BAD_INPUTS[label]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.vggbench._bn_act(*{**args, **change(args)}.values())


def test_cpu_running_stats_with_cuda_batch_stats_raise():
    sample = make_sample("split", "cuda")
    _, mean, var = torch.ops.vggbench._conv_stats(sample.input, sample.weight, None, 1, sample.padding)
    with pytest.raises(RuntimeError, match="running_mean is on cpu but batch_mean is on cuda"):
        torch.ops.vggbench.update_running_stats_(sample.running_mean.cpu(), sample.running_var,
                                                 sample.num_batches_tracked, mean, var, None, 0.1, 100)


# --- CUDA graphs in training: vggbench.train --cuda-graphs (vggbench/graphs.py) -------------------
GRAPH_RUN = ["--model", "vgg38", "--variant", "bn_rc", "--impl", "fused", "--channels-last", "--dataset", "synthetic",
             "--synthetic-train-size", "540", "--synthetic-test-size", "100", "--val-size", "100", "--batch-size", "48",
             "--epochs", "2", "--workers", "0", "--device", "cuda", "--no-progress", "--seed", "3",
             "--gradflow-every", "4"]  # 440 training images: 9 batches of 48 and one of 8 per epoch


def study_trainer(tmp_path, name: str, *options: str) -> Trainer:
    """A Trainer of fused VGG38 BN+RC, channels_last, on a small synthetic set (GRAPH_RUN plus `options`)."""
    args = [*GRAPH_RUN, "--out-dir", str(tmp_path / name), *options]
    cfg = TrainConfig(**vars(build_parser().parse_args(args)))
    configure_determinism(cfg.deterministic, torch.device("cuda"))
    return Trainer(cfg, torch.device("cuda"))


def train_rows(trainer: Trainer, epochs: Iterable[int]) -> list[dict]:
    """The metric rows of `epochs` without timings and the dataset's name: numbers only."""
    return [{k: v for k, v in row.items() if k != "dataset"}
            for row in without_timing([trainer.run_epoch(epoch)[0] for epoch in epochs])]


def test_cuda_graph_training_matches_eager(tmp_path):
    """Two epochs of bf16 autocast training replayed from CUDA graphs (re-captured for epoch 2's learning
    rate; the last batch of 8 eager) stay as close to the eager run as fp32 training is to bf16's (the
    error the precision itself makes, on this GPU), and every replay really steps: Adam's step counts
    and BatchNorm's batch counts reach the 20 batches."""
    graphed = study_trainer(tmp_path, "graphs", "--precision", "bf16", "--cuda-graphs")
    rows = {"graphs": train_rows(graphed, (1, 2))}
    for name, precision in (("eager", "bf16"), ("fp32", "fp32")):
        rows[name] = train_rows(study_trainer(tmp_path, name, "--precision", precision), (1, 2))
    for key in ("train_loss", "val_loss"):
        for epoch in range(2):
            got, eager, fp32 = (rows[name][epoch][key] for name in ("graphs", "eager", "fp32"))
            assert abs(got - eager) <= abs(fp32 - eager) + 4 * 2**-8 * abs(eager), (key, epoch + 1, rows)
    step = graphed.train_step
    assert step.captures == 2 and step.warmup_left == 0
    assert step.captured_key == [rows["graphs"][1]["lr"]] != [rows["graphs"][0]["lr"]]  # captured again
    assert graphed.eval_step.captures == 1
    assert all(int(state["step"]) == 20 for state in graphed.optimizer.state.values())
    tracked = [b for name, b in graphed.model.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 20 for b in tracked)
    assert [e["steps"] for e in graphed.recorder.epochs] == [10, 10]


def test_cuda_graph_training_resumes_like_uninterrupted(tmp_path):
    """float32, deterministic: a --cuda-graphs run resumed after epoch 1 from its checkpoint state (through
    torch.save and a CPU load, as vggbench.checkpoint does) trains epoch 2 as the uninterrupted run does,
    although it warms up and captures afresh; an eager checkpoint resumes under graphs too."""
    options = ("--precision", "fp32", "--deterministic")
    uninterrupted = study_trainer(tmp_path, "full", *options, "--cuda-graphs")
    train_rows(uninterrupted, (1,))
    path = tmp_path / "state.pt"
    torch.save(uninterrupted.state_dict(), path)
    expected = train_rows(uninterrupted, (2,))
    resumed = study_trainer(tmp_path, "resumed", *options, "--cuda-graphs")
    resumed.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert resumed.optimizer.param_groups[0]["capturable"]
    got = train_rows(resumed, (2,))
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    eager_start = study_trainer(tmp_path, "eager", *options)
    train_rows(eager_start, (1,))
    continued = study_trainer(tmp_path, "continued", *options, "--cuda-graphs")
    continued.load_state_dict(eager_start.state_dict())
    row = continued.train_epoch(2)
    assert row["train_loss"] > 0 and math.isfinite(row["train_loss"]), row
    # a capturable optimiser continues an eager run's state: its step counts go on from epoch 1's 10 steps
    assert all(int(state["step"]) == 20 for state in continued.optimizer.state.values())


def test_cuda_graph_evaluation_matches_eager(tmp_path):
    """The captured eval forward gives the eager evaluation's loss and accuracy for the same weights (two
    evaluations of 100 images: 3 batches of 48 warm up, the fourth is captured and replayed, 4 images eager)."""
    graphed = study_trainer(tmp_path, "graphs", "--precision", "bf16", "--cuda-graphs")
    eager = study_trainer(tmp_path, "eager", "--precision", "bf16")
    eager.model.load_state_dict(graphed.model.state_dict())
    for _ in range(2):  # the second evaluation replays the graph for every full batch
        got = graphed.evaluate(graphed.splits.val, "validation")
    assert graphed.eval_step.captures == 1
    expected = eager.evaluate(eager.splits.val, "validation")
    assert got == (pytest.approx(expected[0], rel=1e-6), expected[1])


def test_cuda_graph_replays_make_no_host_sync(tmp_path):
    """Once captured, a training step and an eval forward replay with no host sync at all
    (torch.cuda.set_sync_debug_mode("error") raises on any)."""
    trainer = study_trainer(tmp_path, "graphs", "--precision", "bf16", "--cuda-graphs")
    trainer.run_epoch(1)  # training warmed up and captured, evaluation warmed up twice
    images = torch.randn(48, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 100, (48,), device="cuda")
    trainer.train_model.train()
    trainer.train_step(images, targets)  # captured again: epoch 2's learning rate (a capture synchronises)
    trainer.model.eval()
    with torch.no_grad():
        for _ in range(2):  # the last warm-up, then the capture
            trainer.eval_step(images, targets)
    trainer.train_model.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step(images, targets)
        trainer.model.eval()
        with torch.no_grad():
            trainer.eval_step(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.train_step.captures == 2 and trainer.eval_step.captures == 1


def test_benchmark_graph_variants_replay_without_host_syncs():
    """The benchmarks' sync counter counts a sync, and their CUDA-graph step variant runs its warm-up steps
    then replays a whole step (BatchNorm's batch counts go 3 -> 4) with none."""
    assert count_host_syncs(lambda: torch.ones(1, device="cuda").item()) == 1
    bench = ModelBench(ModelCase("vgg08bnrc", 8, autocast=True, graphs=True), torch.device("cuda"))
    model = bench.model("fused+graph")
    replay = bench.step_fn(model, "fused+graph")
    tracked = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == WARMUP_STEPS for b in tracked)  # the capture itself ran nothing
    assert count_host_syncs(replay) == 0
    assert all(int(b) == WARMUP_STEPS + 1 for b in tracked)
