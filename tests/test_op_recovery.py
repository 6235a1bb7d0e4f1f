"""The backward's recover-or-recompute rule (csrc/fused_unit_math.h) keeps every gradient
within 4x native's error against float64.

For each configuration, the fused op's and native's gradients (in the tested dtype) are
compared with native's in float64 on the same values, computed in the other memory layout
(so that native float64 is not compared with the very same float64 arithmetic: its error
is then the roundoff of another summation order, not 0). The error of a gradient is its
largest absolute deviation; the fused op's may be at most 4x native's, or 4x a floor of a
few units of roundoff at the gradient's scale (its largest magnitude) where native's is
smaller. Small, negative and zero BN weights, every slope (0 and 1 included), with and
without a residual, every CPU dtype and both layouts.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.test_ops import Sample, assert_matches_native, in_layout, make_sample, reference
from vggbench import ops
from vggbench.bench.scaling import torch_threads
from vggbench.memory import saved_bytes

GAMMAS = {
    "issue": [1e-3, -1e-4, 1.0, 0.7],  # the example: fp32 slope 1 lost 100x on channels 0 and 1
    "tiny": [1e-8, -1e-6, 0.0, 2.0],
    "mixed": [-0.3, 0.05, -1.5, 1e-2],
    "unit": [1.0, -1.0, 0.5, -0.5],
}
SLOPES = [0.0, 0.01, 0.3, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
ROUNDOFF_UNITS = 4  # the floor: this many units of roundoff of the dtype at the gradient's scale


@pytest.fixture(autouse=True)
def recovery_policy(monkeypatch):
    """The rule, in every dtype ("auto" keeps bfloat16's conv output instead of recovering);
    a test may set another policy."""
    monkeypatch.setattr(ops, "RECOMPUTE", "rule")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gradient_errors(sample, kink: float) -> dict[str, tuple[float, float, float]]:
    """Per gradient: (fused error, native error, floor), errors vs native float64."""
    ref = sample.cast(torch.float64)
    channels_last = ops.memory_format_of(sample.input) == torch.channels_last
    other = torch.contiguous_format if channels_last else torch.channels_last
    for name in ("input", "residual"):
        if getattr(ref, name) is not None:
            setattr(ref, name, getattr(ref, name).detach().contiguous(memory_format=other).requires_grad_())
    native = sample.cast(sample.input.dtype)
    pre = reference(**(ref.cast(torch.float64).kwargs() | {"negative_slope": 1.0})).detach()
    out = ops.conv_bn_act(**sample.kwargs())
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    # Where |pre| is tiny the output's sign may differ from float64's: leave the kink out
    grad_out[pre.abs() < kink * pre.abs().max()] = 0
    grad_out = grad_out.to(out.dtype)
    names = list(sample.grad_inputs())
    fused = torch.autograd.grad(out, list(sample.grad_inputs().values()), grad_out)
    native_out = reference(**native.kwargs())
    natives = torch.autograd.grad(native_out, list(native.grad_inputs().values()), grad_out)
    truth = torch.autograd.grad(reference(**ref.kwargs()), list(ref.grad_inputs().values()), grad_out.double())
    u = unit_roundoff(sample.input.dtype)
    result = {}
    for name, f, n, t in zip(names, fused, natives, truth):
        result[name] = ((f.double() - t).abs().max().item(), (n.double() - t).abs().max().item(),
                        ROUNDOFF_UNITS * u * t.abs().max().item())
    return result


CASES = list(itertools.product(DTYPES, ("contiguous", "channels_last"), GAMMAS, SLOPES, (False, True)))


@pytest.mark.parametrize(("dtype", "layout", "gammas", "slope", "residual"), CASES,
                         ids=[f"{str(d).removeprefix('torch.')}-{lay}-{g}-slope{s:g}" + "-residual" * r
                              for d, lay, g, s, r in CASES])
def test_every_gradient_within_4x_native(dtype, layout, gammas, slope, residual):
    # 8 -> 4 channels, 6x6 (the example), and a larger batch where sums are long
    for n, size in ((2, 6), (8, 10)):
        sample = make_sample(f"recovery-{gammas}-{slope}-{residual}-{n}", "cpu", dtype, True, n=n, c=8, k=4,
                             size=size, residual=residual, slope=slope, layout=layout, gamma=GAMMAS[gammas])
        kink = 1e-2 if dtype == torch.bfloat16 else 1e-4
        for name, (fused, native, floor) in gradient_errors(sample, kink).items():
            assert fused <= 4 * max(native, floor), (
                f"N={n}: grad of {name}: fused error {fused:.3g} > 4 x max(native {native:.3g}, floor {floor:.3g})")


def partial_sample(dtype: torch.dtype, layout: str, residual: bool) -> Sample:
    """32 output channels, two of them flagged by the rule (tiny BN weights, a BN bias 1e5
    times larger), the others not."""
    gamma = [1e-6, -1e-5] + [(-1) ** c * (0.6 + 0.05 * c) for c in range(30)]
    sample = make_sample(f"partial-{dtype}-{layout}-{residual}", "cpu", dtype, True, n=4, c=8, k=32, size=8,
                         residual=residual, slope=0.01, layout=layout, gamma=gamma)
    with torch.no_grad():  # so that the rule flags the tiny BN weights only
        sample.bn_bias.fill_(0.1)
        if residual:
            sample.residual.mul_(0.1)
    return sample


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_recompute_of_the_flagged_channels_only(dtype, layout, residual):
    """Two of 32 channels flagged: only 8 channels (those and the next ones: the conv's
    register blocks) are recomputed, by one conv over their weights, the others recovered into
    a tensor (the recover_xhat pass); every gradient stays within 4x native's error, and
    within the dtype's tolerance against float64. The fused op's convs here are the same
    Winograd kernels in either layout (contiguous through channels_last copies), while ATen
    picks its conv by layout, and so native's error differs with it (float32 input gradient,
    no residual: 2.5e-6 contiguous, 4.4e-6 channels_last): native's error is the larger of
    its two layouts' on the same values."""
    sample = partial_sample(dtype, layout, residual)
    out = ops.conv_bn_act(**sample.kwargs())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.autograd.grad(out, [sample.input], torch.ones_like(out))
    names = [e.name for e in prof.events()]
    assert names.count("vggbench::recompute_xhat") == 1 and names.count("vggbench::cpu::recover_xhat") == 1
    convs = [e.input_shapes[1] for e in prof.events() if e.name == "aten::convolution"]
    assert convs in ([], [[8, 8, 3, 3]]), convs  # Winograd's (no ATen op) or ATen's, over 8 channels
    relaid = sample.cast(dtype)
    for name in ("input", "residual"):
        if (t := getattr(relaid, name)) is not None:
            other = "contiguous" if layout == "channels_last" else "channels_last"
            setattr(relaid, name, in_layout(t.detach(), other).requires_grad_())
    natives_relaid = {name: errors[1] for name, errors in gradient_errors(relaid, 1e-4).items()}
    for name, (fused, native, floor) in gradient_errors(sample, 1e-4).items():
        native = max(native, natives_relaid[name])
        assert fused <= 4 * max(native, floor), (
            f"grad of {name}: fused error {fused:.3g} > 4 x max(native {native:.3g}, floor {floor:.3g})")
    assert_matches_native(sample, sample.cast(torch.float64))


def bn_backward(sample: Sample, policy: str, threads: int, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one training step on a copy of `sample`, under the backward policy, on
    `threads` threads, and how many recomputes of xhat the backward ran."""
    monkeypatch.setattr(ops, "RECOMPUTE", policy)
    sample = sample.cast(sample.input.dtype)
    with torch_threads(threads):
        out = ops.conv_bn_act(**sample.kwargs())
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            grads = torch.autograd.grad(out, list(sample.grad_inputs().values()), grad_out)
    recomputes = [e.name for e in prof.events()].count("vggbench::recompute_xhat")
    return dict(zip(sample.grad_inputs(), grads)), recomputes


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_partial_recompute_keeps_the_bits_of_recompute_and_recovery(layout, residual, monkeypatch):
    """The partial recompute's xhat (float32) is, bit for bit, the whole recompute's (policy
    "all") in the 8 recomputed channels and the recovery's in the others (the same unit with
    ordinary BN weights in the flagged channels: nothing recomputed): so are the BN weight
    gradients (per channel sum(g * xhat)). Every gradient is bitwise the same for 1 and 2
    threads. (In float64 the rule flags one of this sample's ordinary channels too; bfloat16
    recomputes whole units.)"""
    sample = partial_sample(torch.float32, layout, residual)
    partial, _ = bn_backward(sample, "rule", 1, monkeypatch)
    again, _ = bn_backward(sample, "rule", 2, monkeypatch)
    assert all(torch.equal(partial[name], again[name]) for name in partial), "thread count changed the bits"
    recomputed, _ = bn_backward(sample, "all", 2, monkeypatch)
    assert torch.equal(partial["bn_weight"][:8], recomputed["bn_weight"][:8])
    assert torch.equal(partial["bn_bias"], recomputed["bn_bias"])
    with torch.no_grad():
        sample.bn_weight[:2] = torch.tensor([0.6, -0.6])
    recovered, recomputes = bn_backward(sample, "rule", 2, monkeypatch)
    assert recomputes == 0
    assert torch.equal(partial["bn_weight"][8:], recovered["bn_weight"][8:])


@pytest.mark.parametrize("policy", ["rule", "all", "keep"])
def test_policies_agree_with_native(policy, monkeypatch):
    """Every backward policy (recover where the rule allows / always recompute: the
    capture-safe one / keep the conv output) meets the 4x rule on the issue's example, on the CPU."""
    monkeypatch.setattr(ops, "RECOMPUTE", policy)
    sample = make_sample("policy", "cpu", torch.float32, True, n=2, c=8, k=4, size=6, residual=True, slope=1.0,
                         gamma=GAMMAS["issue"])
    for name, (fused, native, floor) in gradient_errors(sample, 1e-4).items():
        assert fused <= 4 * max(native, floor), name


def test_unknown_policy_is_refused_and_the_policy_kept(monkeypatch):
    monkeypatch.setattr(ops, "RECOMPUTE", "all")
    with pytest.raises(ValueError, match="RECOMPUTE must be one of"):
        ops.RECOMPUTE = "sometimes"
    assert ops.RECOMPUTE == "all"
    with pytest.raises(ValueError, match="the policy must be auto, rule, all or keep"):  # the C++ side checks too
        torch.ops.vggbench._set_recompute("sometimes")


@pytest.mark.parametrize(("dtype", "policy", "channels"), [(torch.bfloat16, "auto", 8), (torch.float32, "keep", 8),
                                                           (torch.float64, "keep", 8), (torch.float32, "auto", 3)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_keeping_the_conv_output_gives_the_bits_of_recompute(dtype, policy, channels, layout, monkeypatch):
    """Under "keep" (and "auto" on the CPU for bfloat16 and for convs of fewer than 8 input
    channels, as the entry conv) the forward keeps the conv output for the backward: one
    activation more than the rule's policy saves, no recompute and one reduction in the
    backward, and output and gradients bit for bit those of always recomputing it (the same
    conv output, normalised alike), on a unit whose channels the rule flags."""
    sample = make_sample(f"keep-{dtype}-{layout}-{channels}", "cpu", dtype, True, n=4, c=channels, k=8, size=8,
                         residual=True, bias=True, layout=layout, gamma=GAMMAS["issue"] + GAMMAS["unit"])
    inputs = list(sample.grad_inputs().values())
    grad_out = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    activation = grad_out.numel() * grad_out.element_size()
    results, saved = {}, {}
    for name in ("all", policy):
        monkeypatch.setattr(ops, "RECOMPUTE", name)
        saved[name] = saved_bytes(lambda: ops.conv_bn_act(**sample.kwargs()), exclude=inputs).activations
        out = ops.conv_bn_act(**sample.kwargs())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            grads = torch.autograd.grad(out, inputs, grad_out)
        names = [e.name for e in prof.events()]
        results[name] = (out, *grads)
        if name == policy:
            assert names.count("vggbench::recompute_xhat") == 0 and names.count("vggbench::conv") == 0, names
            assert names.count("vggbench::cpu::backward_reduce") == 1
    assert all(torch.equal(a, b) for a, b in zip(results[policy], results["all"]))
    assert saved[policy] - saved["all"] == activation, saved


@pytest.mark.parametrize(("dtype", "channels", "kept"), [(torch.float32, 3, True), (torch.float32, 7, True),
                                                        (torch.float32, 8, False), (torch.float64, 16, False),
                                                        (torch.bfloat16, 16, True)], ids=str)
def test_auto_keeps_the_conv_output_for_bfloat16_and_few_input_channels(dtype, channels, kept, monkeypatch):
    """"auto" on the CPU keeps the conv output (one activation more saved than "rule") for
    bfloat16, and for convs of fewer than 8 input channels, where recovering xhat costs a large
    share of the unit; otherwise it saves what "rule" saves."""
    sample = make_sample(f"auto-{dtype}-{channels}", "cpu", dtype, True, n=2, c=channels, k=8, size=6)
    inputs = list(sample.grad_inputs().values())
    saved = {}
    for policy in ("rule", "auto"):
        monkeypatch.setattr(ops, "RECOMPUTE", policy)
        saved[policy] = saved_bytes(lambda: ops.conv_bn_act(**sample.kwargs()), exclude=inputs).activations
    activation = 2 * 8 * 6 * 6 * torch.empty((), dtype=dtype).element_size()
    assert saved["auto"] - saved["rule"] == (activation if kept else 0), saved


@pytest.mark.parametrize("policy", ["rule", "all"])
def test_the_backward_reads_the_policy_when_it_runs(policy, monkeypatch):
    """The policy the C++ backward follows is the one set when it runs, not at the forward."""
    sample = make_sample("policy-late", "cpu", torch.float32, True, n=4, c=8, k=4, size=8,
                         gamma=[1.0, -1.0, 0.8, 1.2])
    sample.bn_bias = torch.zeros_like(sample.bn_bias).requires_grad_()  # xhat recoverable: "rule" recovers
    monkeypatch.setattr(ops, "RECOMPUTE", "rule" if policy == "all" else "all")
    out = ops.conv_bn_act(**sample.kwargs())
    monkeypatch.setattr(ops, "RECOMPUTE", policy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    recomputes = [e.name for e in prof.events()].count("vggbench::recompute_xhat")
    assert recomputes == (1 if policy == "all" else 0)

