"""No host reads in a training step of the fused op (torch.profiler on the CPU), plain and
synchronised on 2 gloo ranks, and how many ops each unit dispatches: the launch budget of
csrc/fused_unit.h (a training unit with BN and a residual: forward = conv + 3 passes,
backward = the conv's backward + at most 3, eval = conv + 1; the running-statistics update
is one of the forward's passes)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tests.test_ops import make_sample
from vggbench import launch, ops
from vggbench.bench.op_counts import dispatch_counts
from vggbench.models import build_model, convert_sync_batchnorm

HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")
RECOMPUTE = "vggbench::recompute_xhat"  # the record_function of the backward's recompute


def event_counts(step) -> collections.Counter:
    """Names of the ops `step()` dispatches, counted (torch.profiler on the CPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(event.name for event in prof.events())


def host_reads(counts: collections.Counter) -> dict[str, int]:
    return {name: counts[name] for name in HOST_READS if counts[name]}


def unit_step(sample) -> None:
    out = ops.conv_bn_act(**sample.kwargs())
    out.backward(torch.ones_like(out))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", ["recovered", "recomputed"])
@pytest.mark.parametrize("policy", ["rule", "all"])
def test_fused_unit_step_reads_nothing_on_the_host(momentum, case, policy, monkeypatch):
    """Forward, running-statistics update (momentum None: a cumulative average) and
    backward, with xhat recovered (BN weights ~1, no shift, no residual) or recomputed
    (the issue's small BN weights, a residual), under either policy."""
    monkeypatch.setattr(ops, "RECOMPUTE", policy)
    recovered = case == "recovered"
    sample = make_sample("profile", "cpu", torch.float32, True, n=4, c=8, k=4, size=8, residual=not recovered,
                         bias=True, momentum=momentum, layout="channels_last",
                         gamma=[1.0, -1.0, 0.8, 1.2] if recovered else [1e-3, -1e-4, 1.0, 0.7])
    if recovered:
        sample.bn_bias = torch.zeros_like(sample.bn_bias).requires_grad_()
    counts = event_counts(lambda: unit_step(sample))
    assert counts["vggbench::conv_bn_act"] == 1 and counts["vggbench::_conv_bn_act_backward"] == 1
    assert host_reads(counts) == {}
    assert counts[RECOMPUTE] == (0 if recovered and policy == "rule" else 1)


CONV, CONV_BACKWARD = "vggbench::conv", "vggbench::conv_backward"


def budget_sample(layout: str, bias: bool, dtype: torch.dtype, bn: str = "train"):
    """A unit with BN and a residual whose xhat the rule recovers (|gamma| ~ 1, no shift, a small
    residual): the budget's common case."""
    sample = make_sample(f"budget-{layout}-{bias}-{dtype}-{bn}", "cpu", dtype, True, n=4, c=8, k=4, size=8,
                         residual=True, bias=bias, layout=layout, bn=bn, gamma=[1.0, -1.0, 0.8, 1.2])
    with torch.no_grad():
        sample.residual.mul_(0.1)
        sample.bn_bias.zero_()
    return sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_unit_keeps_the_launch_budget(layout, bias, dtype, monkeypatch):
    """Training forward: the conv + batch statistics, normalise+act, running-statistics update;
    backward: the conv's backward + reduction + apply (+ the conv bias's zero gradient); eval: the
    conv + normalise+act. Nothing else that computes (no bias pass, no per-channel ATen ops)."""
    monkeypatch.setattr(ops, "RECOMPUTE", "rule")
    sample = budget_sample(layout, bias, dtype)
    out = ops.conv_bn_act(**sample.kwargs())
    forward = dispatch_counts(lambda: ops.conv_bn_act(**sample.kwargs()))
    assert forward[CONV] == 1 and sum(forward.values()) <= 1 + 3, forward
    grad = torch.ones_like(out)
    backward = dispatch_counts(lambda: out.backward(grad))
    assert backward[RECOMPUTE] == 0, "the sample is one the rule recovers"
    passes = {name: count for name, count in backward.items() if name != "aten::add_"}  # add_: AccumulateGrad's
    # the conv bias's exact gradient under batch statistics, 0: one fill of K values, no pass
    assert passes.pop("aten::zeros_like", 0) == bias, backward
    assert passes[CONV_BACKWARD] == 1 and sum(passes.values()) <= 1 + 3, backward
    sample.training = False
    with torch.no_grad():
        evaluation = dispatch_counts(lambda: ops.conv_bn_act(**sample.kwargs()))
    assert evaluation[CONV] == 1 and sum(evaluation.values()) <= 1 + 1, evaluation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_adds_the_conv_and_a_reduction(dtype, monkeypatch):
    """The rule's rare case: xhat recomputed costs the recompute (one profiler scope: the conv
    alone, as the CPU passes normalise its output in their registers) and a second reduction."""
    monkeypatch.setattr(ops, "RECOMPUTE", "rule")
    sample = make_sample(f"budget-recompute-{dtype}", "cpu", dtype, True, n=4, c=8, k=4, size=8, residual=True,
                         gamma=[1e-3, -1e-4, 1.0, 0.7])
    out = ops.conv_bn_act(**sample.kwargs())
    grad = torch.ones_like(out)
    backward = dispatch_counts(lambda: out.backward(grad))
    passes = {name: count for name, count in backward.items() if name != "aten::add_"}
    assert passes == {CONV_BACKWARD: 1, "vggbench::cpu::backward_reduce": 2, RECOMPUTE: 1,
                      "vggbench::cpu::backward_apply": 1}, backward
    out = ops.conv_bn_act(**sample.kwargs())
    nested = event_counts(lambda: out.backward(grad))
    assert nested[RECOMPUTE] == 1 and nested[CONV] == 1, nested
    assert nested["vggbench::cpu::normalize_act"] == 0, nested


def test_winograd_unit_step_copies_nothing():
    """A channels_last float32 training step on the CPU's Winograd convs dispatches no copy:
    the weight transforms read the 3x3 weights through their strides and the weight gradient
    is written channels_last (each copy of the weights cost ~0.02 ms, ~5% of a 32->32 unit
    at 8x8)."""
    if torch.ops.vggbench.winograd_isa() == "none":
        pytest.skip("no AVX2+FMA: the convs run through ATen")
    sample = make_sample("copies", "cpu", torch.float32, True, n=4, c=8, k=8, size=8, residual=True, bias=True,
                         layout="channels_last", gamma=[1.0, -1.0, 0.8, 1.2, 1.0, 0.9, -1.1, 1.0])
    unit_step(sample)
    counts = event_counts(lambda: unit_step(sample))
    assert counts[CONV] == 1 and counts[CONV_BACKWARD] == 1
    assert {name: counts[name] for name in ("aten::copy_", "aten::clone") if counts[name]} == {}, counts


def vgg38_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    F.cross_entropy(model(images), labels).backward()


def vgg38_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 100, (n,), generator=gen)


def test_vgg38_bn_rc_step_reads_nothing_on_the_host():
    torch.manual_seed(0)
    model = build_model("vgg38", "bn_rc", filters=8, impl="fused").to(memory_format=torch.channels_last)
    counts = event_counts(lambda: vgg38_step(model, *vgg38_batch(4)))
    assert counts["vggbench::conv_bn_act"] >= 37
    assert host_reads(counts) == {}


def sync_rank(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: one VGG38 BN+RC training step with --sync-bn under the profiler."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model("vgg38", "bn_rc", filters=8, impl="fused"))
    counts = event_counts(lambda: vgg38_step(model, *vgg38_batch(2, seed=rank)))
    torch.save(dict(counts), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_vgg38_bn_rc_sync_bn_step_reads_nothing_on_the_host(tmp_path):
    mp.spawn(sync_rank, args=(launch.free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        counts = collections.Counter(torch.load(tmp_path / f"rank{rank}.pt"))
        assert counts["vggbench::_conv_stats"] >= 30, "the synchronised path ran"
        # one reduction per unit: the sums op, then the backward with the sums (no second one)
        assert counts["vggbench::_conv_bn_act_backward_sums"] == counts["vggbench::_conv_stats"]
        assert host_reads(counts) == {}, f"rank {rank}"
