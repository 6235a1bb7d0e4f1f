"""Op-level tests of the fused conv -> BatchNorm -> (+residual) -> LeakyReLU op.

torch.ops.vggbench.conv_bn_act (through vggbench.ops.conv_bn_act), its registered backward
and update_running_stats_ against the native chain F.conv2d -> F.batch_norm -> (+ residual)
-> F.leaky_relu: registration (opcheck), float64 gradients (gradcheck), equivalence of
outputs, gradients and running statistics across dtypes, layouts and the study's shapes,
errors on bad inputs, NaN/Inf propagation, and the backward's recompute fallback.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.helpers import cudnn_flags
from vggbench import ops
from vggbench.bench.scaling import torch_threads
from vggbench.tolerances import TOLERANCES, Tolerance

requires_cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py); scripts/gpu_check.sh runs -m cuda
ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
TENSOR_FIELDS = ("input", "weight", "bias", "bn_weight", "bn_bias", *BN_BUFFERS, "residual")


@pytest.fixture(autouse=True)
def ieee_float32():
    """cuDNN may run float32 convs in TF32 (10-bit mantissa); the float32 tolerances assume IEEE float32.
    Its algorithms stay the default, possibly non-deterministic ones users get."""
    with cudnn_flags(deterministic=False):
        yield


@pytest.fixture
def deterministic_cudnn():
    """For tests asserting bitwise equality of results that include cuDNN's backward: its default
    algorithms may add with atomics, in another order on every call."""
    with cudnn_flags(deterministic=True):
        yield


def reference(
    input, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
    num_batches_tracked=None, residual=None, *, stride=1, padding=0, training=False, momentum=0.1,
    eps=1e-5, negative_slope=0.01,
) -> Tensor:
    """The native chain the op replaces; updates running statistics as nn.BatchNorm2d.forward does."""
    out = F.conv2d(input, weight, bias, stride, padding)
    if bn_weight is not None:
        factor = 0.0 if momentum is None else momentum
        if training and running_mean is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average
                factor = 1.0 / float(num_batches_tracked)
        out = F.batch_norm(out, running_mean, running_var, bn_weight, bn_bias,
                           training or running_mean is None, factor, eps)
    if residual is not None:
        out = out + residual
    return F.leaky_relu(out, negative_slope)


def in_layout(t: Tensor, layout: str) -> Tensor:
    """t's values laid out contiguous, channels_last, strided (every other column of a twice
    as wide tensor) or permuted (an (N, H, C, W) buffer seen as (N, C, H, W))."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    assert layout == "contiguous", layout
    return t.contiguous()


@dataclasses.dataclass
class Sample:
    """One labelled call of ops.conv_bn_act: its tensors and options, by keyword."""

    label: str
    input: Tensor
    weight: Tensor
    bias: Tensor | None = None
    bn_weight: Tensor | None = None
    bn_bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: Tensor | None = None
    residual: Tensor | None = None
    stride: int = 1
    padding: int = 0
    training: bool = False
    momentum: float | None = 0.1
    eps: float = 1e-5
    negative_slope: float = 0.01

    def kwargs(self) -> dict:
        """Arguments of ops.conv_bn_act (and of `reference`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "label"}

    @property
    def use_batch_stats(self) -> bool:
        return self.bn_weight is not None and (self.training or self.running_mean is None)

    def op_args(self) -> tuple:
        """Positional arguments of torch.ops.vggbench.conv_bn_act, as ops.conv_bn_act passes them."""
        stats = (None, None) if self.use_batch_stats else (self.running_mean, self.running_var)
        return (self.input, self.weight, self.bias, self.bn_weight, self.bn_bias, *stats, self.residual,
                self.stride, self.padding, self.use_batch_stats, self.eps, self.negative_slope)

    def grad_inputs(self) -> dict[str, Tensor]:
        """The differentiable tensors present that require grad, by name."""
        return {name: t for name in ops.GRAD_INPUTS if (t := getattr(self, name)) is not None and t.requires_grad}

    def cast(self, dtype: torch.dtype) -> Sample:
        """Detached copies (floating point ones in `dtype`), with the same requires_grad."""
        def copy(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            c = t.detach().to(dtype if t.is_floating_point() else t.dtype, copy=True)
            return c.requires_grad_(t.requires_grad)
        return dataclasses.replace(self, **{name: copy(getattr(self, name)) for name in TENSOR_FIELDS})


def make_sample(
    label: str, device: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False, *,
    n: int = 2, c: int = 3, k: int = 4, size: int = 6, kernel: int = 3, stride: int = 1, bn: str = "train",
    bias: bool = False, residual: bool = False, slope: float = 0.01, layout: str = "contiguous",
    gamma: list[float] | None = None, momentum: float | None = 0.1, param_dtype: torch.dtype | None = None,
) -> Sample:
    """A call with random values seeded by its label. bn: "none", "train", "eval" (running
    statistics given) or "batch" (batch statistics without running ones). BN weights have
    random signs and |gamma| in [0.5, 1.5) unless `gamma` is given; BN parameters and buffers
    are float32 (float64 for float64 activations) unless `param_dtype` says otherwise."""
    gen = torch.Generator().manual_seed(zlib.crc32(label.encode()))
    param_dtype = param_dtype or ops.stats_dtype(dtype)

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype, layout: str = "contiguous",
              grad: bool = requires_grad) -> Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return in_layout(t.to(device=device, dtype=dtype), layout).detach().requires_grad_(grad)

    padding = kernel // 2
    out_size = (size + 2 * padding - kernel) // stride + 1
    sample = Sample(
        label, randn(n, c, size, size, layout=layout), randn(k, c, kernel, kernel, scale=(c * kernel * kernel) ** -0.5),
        stride=stride, padding=padding, training=bn == "train", momentum=momentum, negative_slope=slope,
    )
    if bias:
        sample.bias = randn(k, scale=0.5)
    if residual:
        sample.residual = randn(n, k, out_size, out_size, layout=layout)
    if bn != "none":
        if gamma is None:
            signs = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
            gamma = (signs * (0.5 + torch.rand(k, generator=gen, dtype=torch.float64))).tolist()
        sample.bn_weight = torch.tensor(gamma, dtype=param_dtype, device=device).requires_grad_(requires_grad)
        sample.bn_bias = randn(k, scale=0.5, dtype=param_dtype)
    if bn in ("train", "eval"):
        sample.running_mean = randn(k, scale=0.3, dtype=param_dtype, grad=False)
        sample.running_var = (0.5 + torch.rand(k, generator=gen, dtype=torch.float64)).to(device, param_dtype)
        sample.num_batches_tracked = torch.tensor(3, device=device)
    return sample


def sample_inputs(device: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False,
                  **shape: int) -> Iterator[Sample]:
    """Labelled samples covering the op's options: BN mode x residual x conv bias, the
    slopes 0 and 1, the 1x1 stride-2 projection, non-contiguous layouts, and BN weights at
    and near 0 (the backward's recompute fallback). `shape` overrides n, c, k, size."""
    def sample(label: str, **options) -> Sample:
        return make_sample(label, device, dtype, requires_grad, **shape, **options)

    for bn in ("none", "train", "eval"):
        for residual in (False, True):
            for bias in (False, True):
                yield sample(bn + "-residual" * residual + "-bias" * bias, bn=bn, residual=residual, bias=bias)
    yield sample("batch-stats-only", bn="batch", bias=True)
    for slope in (0.0, 1.0):
        for bn in ("train", "eval"):
            yield sample(f"{bn}-residual-slope{slope:g}", bn=bn, residual=True, slope=slope)
    for bn in ("none", "train", "eval"):
        yield sample(f"{bn}-1x1-stride2", bn=bn, kernel=1, stride=2, slope=1.0, bias=bn == "none")
    for layout in ("channels_last", "strided", "permuted"):
        for bn in ("train", "eval"):
            yield sample(f"{bn}-residual-{layout}", bn=bn, residual=True, bias=True, layout=layout)
    gamma = ([0.0, 1e-9, 0.8, -1.3] * 4)[: shape.get("k", 4)]
    for bn in ("train", "eval"):
        yield sample(f"{bn}-residual-gamma0-gamma1e-9", bn=bn, residual=True, gamma=gamma)
    yield sample("train-gamma0-slope0", bn="train", bias=True, gamma=gamma, slope=0.0)


SAMPLE_LABELS = [s.label for s in sample_inputs("cpu")]


def get_sample(label: str, device: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False,
               **shape: int) -> Sample:
    return next(s for s in sample_inputs(device, dtype, requires_grad, **shape) if s.label == label)


# --- 1. registration ------------------------------------------------------------------
@pytest.mark.parametrize("label", SAMPLE_LABELS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_conv_bn_act(device, label):
    """Schema, autograd registration, fake kernel and AOT dispatch of the forward (and so the backward's fake)."""
    sample = get_sample(label, device, requires_grad=True)
    torch.library.opcheck(torch.ops.vggbench.conv_bn_act, sample.op_args())


@pytest.mark.parametrize("mask", [(True,) * 6, (True, False, True, False, True, False)], ids=["all", "some"])
@pytest.mark.parametrize("label", ["none-residual-bias", "train-residual-bias", "eval-residual-bias",
                                   "train-residual-channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_conv_bn_act_backward(device, label, mask):
    """The backward op on the outputs of a real forward: its fake kernel gives the real gradients' metadata."""
    args = get_sample(label, device).op_args()
    out, mean, var = torch.ops.vggbench.conv_bn_act(*args)
    if label.startswith("eval"):  # the forward returns no statistics; backward takes the running ones
        assert mean.numel() == var.numel() == 0
        mean, var = args[5], args[6]
    grad_out = torch.randn_like(out)
    for recompute_all in (False, True):
        torch.library.opcheck(
            torch.ops.vggbench._conv_bn_act_backward,
            (grad_out, out, *args[:5], args[7], mean, var, *args[8:], recompute_all, list(mask)),
        )


@pytest.mark.parametrize("count_as", ["tensor", "int"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_update_running_stats(device, dtype, momentum, count_as):
    """opcheck (it mutates its first three arguments), and nn.BatchNorm2d's update rule:
    running = (1 - f) * running + f * batch, f = momentum or 1 / num_batches_tracked, the variance unbiased;
    the count given as a 0-d tensor (synchronised BN) or as batch_count."""
    gen = torch.Generator().manual_seed(0)
    running_mean, running_var, batch_mean, batch_var = (torch.rand(5, generator=gen, dtype=dtype).to(device)
                                                        for _ in range(4))
    tracked = torch.tensor(3, device=device)
    count = (torch.tensor(50.0, dtype=dtype, device=device), momentum) if count_as == "tensor" else (None, momentum, 50)
    args = (running_mean, running_var, tracked, batch_mean, batch_var, *count)
    torch.library.opcheck(torch.ops.vggbench.update_running_stats_, args)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    torch.ops.vggbench.update_running_stats_(*args)
    factor = 0.25 if momentum is None else momentum
    torch.testing.assert_close(running_mean, (1 - factor) * expected_mean + factor * batch_mean)
    torch.testing.assert_close(running_var, (1 - factor) * expected_var + factor * batch_var * 50 / 49)
    assert tracked.item() == 4


@pytest.mark.parametrize("label", ["train-residual-bias", "train-residual-channels_last",
                                   "train-residual-gamma0-gamma1e-9"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("deterministic_cudnn")
def test_split_ops_compose_to_conv_bn_act(device, label):
    """The halves synchronised BN runs with cross-rank merges in between (_conv_stats -> _bn_act;
    _conv_bn_act_backward_sums -> _conv_bn_act_backward(local_sums, reduced_sums)) give exactly
    the fused op's results when the merged statistics and sums are the call's own, and the
    same gradients when they come from two identical ranks (sums and count doubled)."""
    args = get_sample(label, device).op_args()
    input, weight, bias, bn_weight, bn_bias, _, _, residual, stride, padding, _, eps, slope = args
    out, mean, var = torch.ops.vggbench.conv_bn_act(*args)
    stats_args = (input, weight, bias, stride, padding)
    z, z_mean, z_var = torch.ops.vggbench._conv_stats(*stats_args)
    assert torch.equal(z_mean, mean) and torch.equal(z_var, var)
    act_args = (z, mean, var, bn_weight, bn_bias, bias, residual, eps, slope)
    assert torch.equal(torch.ops.vggbench._bn_act(*act_args), out)

    grad_out = torch.randn_like(out)
    tensors = (grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var, stride, padding)
    sums_args = (*tensors, eps, slope, False)
    sums = torch.ops.vggbench._conv_bn_act_backward_sums(*sums_args)
    assert sums[-2] == out.numel() // out.shape[1]  # the count
    mask = [True] * 6
    expected = torch.ops.vggbench._conv_bn_act_backward(*tensors, True, eps, slope, False, mask)
    for scale in (1, 2):
        reduced_args = (*tensors, True, eps, slope, False, mask, sums, sums[:-1] * scale)
        for got, want in zip(torch.ops.vggbench._conv_bn_act_backward(*reduced_args), expected):
            assert torch.equal(got, want)
    for op, op_args in ((torch.ops.vggbench._conv_stats, stats_args), (torch.ops.vggbench._bn_act, act_args),
                        (torch.ops.vggbench._conv_bn_act_backward_sums, sums_args),
                        (torch.ops.vggbench._conv_bn_act_backward, reduced_args)):
        torch.library.opcheck(op, op_args)


# --- 2. float64 gradients ---------------------------------------------------------------
@pytest.mark.parametrize("label", SAMPLE_LABELS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, label):
    """Finite differences in float64 on tiny shapes agree with the registered backward for
    every differentiable input (input, weight, bias, bn_weight, bn_bias, residual)."""
    sample = get_sample(label, device, torch.float64, requires_grad=True, n=2, c=2, k=3, size=5)
    names = list(sample.grad_inputs())

    def fn(*tensors: Tensor) -> Tensor:
        return ops.conv_bn_act(**{**sample.kwargs(), **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, tuple(sample.grad_inputs().values()))


@pytest.mark.parametrize("label", SAMPLE_LABELS)
def test_each_gradient_alone_is_the_full_backwards(label):
    """A backward asked for one input's gradient (autograd.grad) computes that one, equal to the
    full backward's, whichever optional inputs are present (autograd's edges skip absent ones)."""
    sample = get_sample(label, "cpu", requires_grad=True)
    inputs = sample.grad_inputs()
    out = ops.conv_bn_act(**sample.kwargs())
    grad_out = torch.randn_like(out)
    full = torch.autograd.grad(out, list(inputs.values()), grad_out, retain_graph=True)
    for (name, tensor), expected in zip(inputs.items(), full):
        (alone,) = torch.autograd.grad(out, [tensor], grad_out, retain_graph=True)
        assert torch.equal(alone, expected), name


@pytest.mark.parametrize("label", ["train-bias", "train-residual-bias", "batch-stats-only", "eval-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bias_gradient_under_batch_statistics_is_exactly_zero(label, dtype):
    """BN with batch statistics subtracts the conv's bias again with the mean, so the output does
    not depend on it: its gradient is exactly 0 (native's sum of grad_z is roundoff). With running
    statistics (eval) the bias shifts the output: its gradient is not zeroed (its values are
    checked against float64 with the others)."""
    sample = get_sample(label, "cpu", dtype, requires_grad=True)
    out = ops.conv_bn_act(**sample.kwargs())
    (grad_bias,) = torch.autograd.grad(out, [sample.bias], torch.randn_like(out))
    assert torch.equal(grad_bias, torch.zeros_like(sample.bias)) == sample.use_batch_stats


@pytest.mark.parametrize("label", ["eval", "eval-residual-bias"])
def test_bfloat16_running_statistics_in_eval(label):
    """A model moved with .to(torch.bfloat16) has bfloat16 BN buffers: eval normalises with them
    widened to float32, exactly as with float32 copies of the same values (forward and backward)."""
    sample = get_sample(label, "cpu", torch.bfloat16, requires_grad=True)
    results = []
    for stats_dtype in (torch.bfloat16, torch.float32):
        kwargs = {**sample.kwargs(), "running_mean": sample.running_mean.to(torch.bfloat16).to(stats_dtype),
                  "running_var": sample.running_var.to(torch.bfloat16).to(stats_dtype)}
        out = ops.conv_bn_act(**kwargs)
        results.append([out, *torch.autograd.grad(out, list(sample.grad_inputs().values()), torch.ones_like(out))])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_double_backward_is_refused():
    """The backward is not differentiable: a second derivative raises instead of coming out wrong."""
    sample = get_sample("train-residual-bias", "cpu", torch.float64, requires_grad=True)
    out = ops.conv_bn_act(**sample.kwargs())
    (grad_input,) = torch.autograd.grad(out.square().sum(), [sample.input], create_graph=True)
    with pytest.raises(RuntimeError, match="conv_bn_act has no double backward"):
        grad_input.sum().backward()


# --- 3. equivalence with the native chain ---------------------------------------------------
def assert_close_scaled(actual: Tensor, expected: Tensor, tol: Tolerance, what: str,
                        scale: Tensor | None = None, norm: bool = False) -> None:
    """actual matches expected elementwise (or in relative norm) relative to |scale| (default: expected)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = (expected if scale is None else scale).detach().double()
    if norm:
        error = (actual - expected).norm() / scale.norm()
        assert error <= tol.grad, f"{what}: relative-norm error {error:.3g} > {tol.grad:.3g}"
    else:
        torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol * scale.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")


def normalized_conv(ref: Sample) -> Tensor:
    """BN's xhat in the native chain of a float64 sample, before its forward updated the running
    statistics: the conv's output normalised by the batch's or the running statistics."""
    conv = F.conv2d(ref.input, ref.weight, ref.bias, ref.stride, ref.padding).detach()
    if ref.use_batch_stats:
        mean, var = conv.mean((0, 2, 3)), conv.var((0, 2, 3), unbiased=False)
    else:
        mean, var = ref.running_mean, ref.running_var
    return (conv - mean.view(1, -1, 1, 1)) * var.view(1, -1, 1, 1).add(ref.eps).rsqrt()


def assert_matches_native(sample: Sample, ref: Sample, seed: int = 0) -> None:
    """One forward and backward of the op and of the native chain in float64 (`ref`: float64
    copies of the sample's values): output, every gradient and the running statistics agree
    to the tolerance of the sample's dtype."""
    dtype = sample.input.dtype
    tol = TOLERANCES[dtype]
    pre = reference(**(ref.cast(torch.float64).kwargs() | {"negative_slope": 1.0})).detach()
    out = ops.conv_bn_act(**sample.kwargs())
    expected = reference(**ref.kwargs())
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=ops.memory_format_of(sample.input, sample.weight))
    assert_close_scaled(out, expected, tol, "output")

    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    if sample.negative_slope != 1.0:
        grad_out[pre.abs() < tol.kink * pre.abs().max()] = 0
    grad_out = grad_out.to(dtype)
    grads = torch.autograd.grad(out, list(sample.grad_inputs().values()), grad_out)
    expected_grads = dict(zip(ref.grad_inputs(), torch.autograd.grad(
        expected, list(ref.grad_inputs().values()), grad_out.double())))
    g = grad_out.double() * torch.where(pre > 0, 1.0, sample.negative_slope)  # at the activation's input
    for (name, tensor), grad in zip(sample.grad_inputs().items(), grads):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        scale = None
        if name == "bias" and sample.use_batch_stats:
            # BN cancels a conv bias: its true gradient is 0, and what is left is the rounding
            # of sum(dz) over M terms of size |gamma * invstd * g|, bounded relative to their sum
            conv = F.conv2d(ref.input, ref.weight, None, ref.stride, ref.padding).detach()
            invstd = conv.var((0, 2, 3), unbiased=False).add(ref.eps).rsqrt()
            scale = ref.bn_weight.detach() * invstd * g.abs().sum((0, 2, 3))
        elif name in ("bn_weight", "bn_bias"):
            # sums over M terms, g * xhat and g: their rounding is bounded relative to the sum of
            # the terms' sizes, not to the sum, which cancels to a fraction of it in some draws
            # (a 2e-3 BN weight gradient of 18 terms of size ~1: native float32 off by 4e-4 of it)
            terms = g.abs() * normalized_conv(ref).abs() if name == "bn_weight" else g.abs()
            scale = terms.sum((0, 2, 3))
        assert_close_scaled(grad, expected_grads[name], tol, f"grad of {name}", scale, norm=tol.grad is not None)

    if sample.running_mean is not None:
        scale = ref.running_var.sqrt()  # both buffers are compared on the scale of the std
        assert_close_scaled(sample.running_mean, ref.running_mean, tol, "running_mean", scale)
        assert_close_scaled(sample.running_var, ref.running_var, tol, "running_var", ref.running_var)
        assert torch.equal(sample.num_batches_tracked, ref.num_batches_tracked)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One of the study's conv units (vggbench/models/vgg.py) at a batch size and resolution."""

    name: str
    n: int
    c: int
    size: int
    kernel: int = 3
    stride: int = 1
    bias: bool = False
    residual: bool = False
    slope: float = 0.01

    def __str__(self) -> str:
        return f"{self.name}-N{self.n}-{self.c}to32-H{self.size}"

    def sample(self, device: str, dtype: torch.dtype, layout: str) -> Sample:
        return make_sample(str(self), device, dtype, True, n=self.n, c=self.c, k=32, size=self.size,
                           kernel=self.kernel, stride=self.stride, bias=self.bias, residual=self.residual,
                           slope=self.slope, layout=layout)


SMALL_UNITS = [
    *(Unit("entry", 2, 3, size) for size in (32, 16, 8)),  # the first conv, 3 -> 32
    *(Unit("block", 2, 32, size, bias=True, residual=True) for size in (32, 16, 8)),  # a block's last conv
    Unit("projection", 2, 32, 32, kernel=1, stride=2, slope=1.0),  # 1x1 stride-2 shortcut, no activation
]
LARGE_UNITS = [Unit("entry", 100, 3, 32), Unit("block", 100, 32, 32, bias=True, residual=True)]


def equivalence_params() -> Iterator:
    for device, dtypes in (("cpu", (torch.float64, torch.float32, torch.bfloat16)),
                           ("cuda", (torch.float32, torch.float16, torch.bfloat16))):
        marks = [requires_cuda] if device == "cuda" else []
        cases = [(dtype, layout, unit) for dtype in dtypes for layout in ("contiguous", "channels_last", "strided")
                 for unit in SMALL_UNITS]
        # the study's batch at full resolution, in its layout (time allows only a few)
        cases += [(dtype, "channels_last", unit) for dtype in (torch.float32, torch.bfloat16) for unit in LARGE_UNITS]
        for dtype, layout, unit in cases:
            yield pytest.param(device, dtype, layout, unit, marks=marks,
                               id=f"{device}-{str(dtype).removeprefix('torch.')}-{layout}-{unit}")


@pytest.mark.parametrize("bn", ["train", "eval", "none"])
@pytest.mark.parametrize("size", [5, 9])
def test_winograd_partial_tiles(bn, size):
    """On the CPU, 3x3 float32 channels_last convs with channel counts divisible by 8 run as
    Winograd F(4x4, 3x3) over 4x4 output tiles (forward, input and weight gradients): sizes
    that are not a multiple of 4 leave partial tiles at the image edges."""
    sample = make_sample(f"winograd-{bn}-{size}", "cpu", torch.float32, True, n=3, c=8, k=16, size=size,
                         bn=bn, bias=True, residual=True, layout="channels_last")
    ref = sample.cast(torch.float64)
    assert_matches_native(sample, ref, seed=3)


@pytest.mark.parametrize(("device", "dtype", "layout", "unit"), list(equivalence_params()))
def test_matches_native_chain(device, dtype, layout, unit):
    """A training step (batch statistics, running statistics updated), then an eval step
    with the updated running statistics (BN folded into the conv): outputs, gradients and
    running statistics match the native chain."""
    sample = unit.sample(device, dtype, layout)
    ref = sample.cast(torch.float64)
    assert_matches_native(sample, ref, seed=1)
    sample.training = ref.training = False
    assert_matches_native(sample, ref, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("size", "k", "residual", "gamma", "bias"), [
    (8, 32, False, None, False), (5, 7, False, None, True), (16, 12, True, None, True), (9, 32, False, "tiny", False),
    (32, 4, True, "tiny", False), (6, 40, False, None, False),
])
def test_entry_conv_weight_gradient_alone(size, k, residual, gamma, bias, dtype):
    """The entry conv's training step on the CPU (3 input channels, images that need no
    gradient, float32 or bfloat16 channels_last): BN's input gradient goes straight into the
    weight gradient (cpu::apply_weight_grad: bfloat16 rounded per value as backward_apply
    stores it, products summed in float32), never stored. It matches the native chain, with
    xhat recovered or (BN weights of 1e-3: the rule's case) recomputed (bfloat16: from the kept
    conv output), odd channel counts, 40 (the AVX-512 kernel's pair of 16-channel chunks,
    then a partial one), a residual that needs no gradient and a conv bias (its
    gradient 0); and it gives the same bits on 1 thread as on 2."""
    gammas = [1e-3 if c % 2 else 1.0 for c in range(k)] if gamma == "tiny" else None
    sample = make_sample(f"entry-alone-{size}-{k}", "cpu", dtype, True, n=5, k=k, size=size,
                         residual=residual, layout="channels_last", gamma=gammas, bias=bias)
    sample.input.requires_grad_(False)
    if residual:
        sample.residual.requires_grad_(False)
    ref = sample.cast(torch.float64)
    assert_matches_native(sample, ref, seed=4)
    out = ops.conv_bn_act(**sample.kwargs())
    counts = collections.Counter(e.name for e in profiled(lambda: out.backward(torch.ones_like(out))))
    assert counts["vggbench::cpu::apply_weight_grad"] == 1 and counts["vggbench::conv_backward"] == 0, counts
    grads = {}
    for threads in (1, 2):
        with torch_threads(threads):
            out = ops.conv_bn_act(**sample.kwargs())
            grads[threads] = torch.autograd.grad(out, [sample.weight], torch.ones_like(out))[0]
    assert torch.equal(grads[1], grads[2])


@pytest.mark.parametrize(("n", "size", "k"), [(100, 8, 32), (7, 5, 7), (3, 11, 12), (2, 1, 8), (9, 16, 32),
                                             (3, 32, 32), (4, 9, 40), (2, 6, 48), (3, 7, 20)])
def test_entry_conv_direct_on_small_maps(n, size, k):
    """On the CPU the entry conv (3 input channels, float32 channels_last) on maps of at most
    16x16 (the AVX-512 passes: 32x32) runs as a direct conv that sums its batch statistics
    as it writes; larger maps take ATen's conv and a batch_stats pass; channel counts
    cover whole and partial groups of the kernel's two chunks (AVX2: 16 channels, 20;
    AVX-512: 32, 40 and 48). Either way the output and
    statistics match float64 within the float32 tolerance (relative to the output's scale),
    with the same bits on 1 thread as on 2."""
    gen = torch.Generator().manual_seed(size * 100 + k)
    x = torch.randn(n, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, 3, 3, 3, generator=gen).add_(0.5)  # a shift: |mean| comparable to std
    results = {}
    for threads in (1, 2):
        with torch_threads(threads):
            results[threads] = torch.ops.vggbench._conv_stats(x, weight, None, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))
    z, mean, var = results[2]
    z64 = F.conv2d(x.double(), weight.double(), padding=1)
    tol = TOLERANCES[torch.float32]
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(z, z64, tol, "z")
    assert_close_scaled(mean, z.double().mean((0, 2, 3)), tol, "mean", scale=z64)
    assert_close_scaled(var, z.double().var((0, 2, 3), unbiased=False), tol, "var", scale=z64.square())
    events = profiled(lambda: torch.ops.vggbench._conv_stats(x, weight, None, 1, 1))
    counts = collections.Counter(e.name for e in events)
    direct = size * size <= {"avx512": 32 * 32, "avx2": 16 * 16}.get(torch.ops.vggbench.winograd_isa(), 128)
    assert counts["vggbench::conv"] == 1 and counts["vggbench::cpu::batch_stats"] == (0 if direct else 1), counts


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(("c", "size", "k", "bn", "bias", "slope", "dtype"), [
    (3, 8, 32, "eval", False, 0.01, F32), (3, 16, 20, "eval", True, 0.2, F32), (3, 5, 7, "none", True, 0.01, F32),
    (3, 11, 40, "none", False, 0.0, F32), (3, 3, 8, "eval", False, 1.0, F32), (3, 32, 32, "eval", True, 0.01, F32),
    (3, 33, 8, "none", True, 0.01, F32), (3, 8, 16, "eval", True, 0.01, BF16),
    (8, 8, 8, "eval", False, 0.01, F32), (16, 5, 32, "none", True, 0.2, F32), (32, 13, 16, "eval", True, 0.0, F32),
    (40, 4, 24, "none", False, 0.01, F32), (16, 8, 32, "eval", True, 0.01, BF16), (8, 5, 8, "none", True, 0.2, BF16),
    (32, 7, 16, "eval", False, 1.0, BF16)], ids=str)
def test_eval_forward_normalises_in_registers(c, size, k, bn, bias, slope, dtype):
    """The eval forward, and the forward without BN, on the CPU (channels_last): where the conv
    is the Winograd one (C and K multiples of 8, float32 or bfloat16) or the entry conv's direct
    one (3 input channels, float32, maps up to 32x32; the baseline build without AVX2: 128
    pixels), each output is normalised and activated in registers as the conv writes it
    (cpu::entry_conv_act, cpu::winograd_conv_act), with no pass over the conv's output, and gives
    the same bits as the conv followed by that pass (the conv's output, as stored, within its
    dtype's tolerance of float64; then _bn_act with the running statistics, or the bias and
    leaky_relu in float32 without BN), on 1 thread as on 2. Other convs keep the pass."""
    gen = torch.Generator().manual_seed(size * 100 + k + c)
    x = torch.randn(5, c, size, size, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=gen).to(dtype)
    conv_bias = torch.randn(k, generator=gen).to(dtype) if bias else None
    gamma, beta = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
    mean, var = torch.randn(k, generator=gen), torch.rand(k, generator=gen) + 0.5
    bn_args = (gamma, beta, mean, var) if bn == "eval" else (None, None, None, None)

    def forward():
        return ops.conv_bn_act(x, weight, conv_bias, *bn_args, padding=1, training=False, negative_slope=slope)

    outs = {}
    for threads in (1, 2):
        with torch_threads(threads):
            outs[threads] = forward()
    assert torch.equal(outs[1], outs[2])
    # the conv alone, through the same path: no BN, no bias and slope 1 leave its output as it is
    z = ops.conv_bn_act(x, weight, None, None, None, None, None, padding=1, training=False, negative_slope=1.0)
    assert_close_scaled(z, F.conv2d(x.double(), weight.double(), padding=1), TOLERANCES[dtype], "z")
    if bn == "eval":
        expected = torch.ops.vggbench._bn_act(z, mean, var, gamma, beta, conv_bias, None, 1e-5, slope)
    else:
        pre = z.float() + conv_bias.float().view(1, -1, 1, 1) if bias else z.float()
        expected = F.leaky_relu(pre, slope).to(dtype)
    assert outs[2].is_contiguous(memory_format=torch.channels_last) and outs[2].dtype == dtype
    assert torch.equal(outs[2], expected)
    counts = collections.Counter(e.name for e in profiled(forward))
    isa = torch.ops.vggbench.winograd_isa()
    if c == 3:
        fused = dtype == F32 and size * size <= (32 * 32 if isa != "none" else 128)
    else:
        fused = isa != "none" and (dtype == F32 or torch.ops.vggbench.winograd_takes_bfloat16())
    assert counts["vggbench::conv"] == 1 and counts["vggbench::cpu::normalize_act"] == (0 if fused else 1), counts


@pytest.mark.skipif(torch.ops.vggbench.winograd_isa() == "none", reason="no AVX2+FMA: the convs run through ATen")
@pytest.mark.parametrize(("n", "c", "k", "h", "w", "dtype"), [
    *((*shape, dtype) for shape in ((2, 8, 8, 5, 7), (3, 24, 16, 9, 4), (2, 16, 40, 1, 1), (2, 32, 8, 11, 3),
                                    (1, 8, 32, 32, 32)) for dtype in (F32, BF16)),
    (3, 3, 32, 8, 8, F32), (2, 3, 20, 5, 9, F32), (4, 3, 8, 16, 16, F32)], ids=str)
def test_contiguous_calls_compute_in_channels_last(n, c, k, h, w, dtype):
    """A contiguous (NCHW) call whose conv the Winograd kernels take runs them on channels_last
    copies (csrc/cpu/transpose.h: 8x8 register blocks, the rest value by value): its outputs are
    contiguous and carry the channels_last call's bits (training forward with its statistics,
    eval forward); without BN, where nothing is reduced across the batch, so do the input and
    weight gradients (grad_z copied to channels_last, the input gradient copied back). The
    3-channel entry conv's direct conv (float32, maps up to 16x16) reads contiguous images as
    they are and its output is copied: the same forward bits (its weight gradient in NCHW is
    ATen's)."""
    if dtype == BF16 and not torch.ops.vggbench.winograd_takes_bfloat16():
        pytest.skip("ATen's bfloat16 convs run on AMX here: bfloat16 does not take the Winograd kernels")
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + h)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    weight = (torch.randn(k, c, 3, 3, generator=gen) / 3).to(dtype)
    gamma, beta = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
    mean, var = torch.randn(k, generator=gen), torch.rand(k, generator=gen) + 0.5
    grad_out = torch.randn(n, k, h, w, generator=gen).to(dtype)
    results = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        xs = x.clone(memory_format=fmt).requires_grad_()
        ws = weight.clone().requires_grad_()
        train = torch.ops.vggbench.conv_bn_act(xs.detach(), weight, None, gamma, beta, None, None, None, 1, 1, True,
                                               1e-5, 0.01)
        evaluation = ops.conv_bn_act(xs.detach(), weight, None, gamma, beta, mean, var, padding=1)
        out = ops.conv_bn_act(xs, ws, padding=1, negative_slope=0.2)
        out.backward(grad_out.contiguous(memory_format=fmt))
        results[fmt] = (*train, evaluation, out, xs.grad, ws.grad)
        assert all(t.is_contiguous(memory_format=fmt) for t in (train[0], evaluation, out, xs.grad)), fmt
    names = ("out", "mean", "var", "eval out", "out (no BN)", "grad input", "grad weight")
    for name, a, b in zip(names[:5] if c == 3 else names, results[torch.contiguous_format],
                          results[torch.channels_last]):
        assert torch.equal(a, b), name


def profiled(step) -> list:
    """The profiler events of `step()` on the CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return list(prof.events())


def random_configuration(seed: int) -> dict:
    """make_sample's options drawn at random (seeded): shapes the study does not use, every BN
    mode, odd and Winograd-sized channel counts, partial tiles, strides and kernel sizes. With
    batch statistics, the weight gradient is a cancellation down to what eps leaves where the
    conv is affine in one input value (one channel, 1x1) or BN sees few values (a 2x2 output of
    one image, say), which float32 resolves only to its terms' rounding (native's own error
    there varies 10x between draws): such draws get 16 values per channel and 2 taps."""
    rng = random.Random(seed)
    n, kernel, stride = rng.choice([1, 2, 3]), rng.choice([1, 3, 3, 5]), rng.choice([1, 1, 2])
    bn = rng.choice(["train", "eval", "batch", "none"])
    size, c = rng.randint(2, 11), rng.choice([1, 3, 5, 8, 16])
    if bn in ("train", "batch"):
        while n * ((size - 1) // stride + 1) ** 2 < 16:  # the output size: padding is kernel // 2
            size += 1
        if kernel == 1:  # a 1x1 conv of one channel is affine in one input value
            c = max(c, 2)
    return dict(n=n, c=c, k=rng.choice([1, 4, 7, 8, 16]), size=size, kernel=kernel,
                stride=stride, bn=bn, bias=rng.random() < 0.5, residual=rng.random() < 0.4,
                slope=rng.choice([0.01, 0.2, 0.0, 1.0]), layout=rng.choice(["contiguous", "channels_last", "strided"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(64))
@pytest.mark.parametrize("device", DEVICES)
def test_random_configurations_match_native(device, seed, dtype):
    """Random combinations of the op's options (random_configuration) match the native chain in
    float64 within the dtype's tolerance, trained and then evaluated as test_matches_native_chain.
    (bfloat16's tolerances are relative norms, which a single-channel sum of a few values can
    exceed by chance, for native bfloat16 too: the structured cases above cover it.)"""
    config = random_configuration(seed)
    sample = make_sample(f"random-{seed}", device, dtype, True, **config)
    ref = sample.cast(torch.float64)
    assert_matches_native(sample, ref, seed=seed)
    if config["bn"] == "train":
        sample.training = ref.training = False
        assert_matches_native(sample, ref, seed=seed + 100)


@pytest.mark.parametrize("bn", ["eval", "train", "none"])
@pytest.mark.parametrize("c", [2, 3, 5])
def test_strided_pointwise_channels_last_weight_gradient(c, bn):
    """A strided 1x1 conv in channels_last with few input channels: ATen's (oneDNN's) weight
    gradient there is wrong by 10-100%, differently from call to call (torch 2.14); the op's
    weight gradient, and in eval the BN weight's gradient derived from it, match float64 on
    every one of several calls."""
    for call in range(4):
        sample = make_sample(f"pointwise-{c}-{bn}-{call}", "cpu", torch.float32, True, n=2, c=c, k=32, size=16,
                             kernel=1, stride=2, bn=bn, layout="channels_last")
        assert_matches_native(sample, sample.cast(torch.float64), seed=call)


def pointwise_gradients_alone_on_one_thread() -> None:
    """Each gradient alone (the bias's and BN weight's alone ran ATen's faulty code too) of strided
    1x1 channels_last convs with 2-7 input channels, on one thread, where that code corrupted the
    heap: every one matches float64 (run in a subprocess by the test below, so a corrupted heap
    fails one test instead of killing the session)."""
    torch.set_num_threads(1)
    for c, bias, bn, alone in itertools.product([2, 3, 5, 7], [False, True], ["train", "eval", "none"],
                                                ["input", "weight", "bias", "bn_weight"]):
        sample = make_sample(f"pointwise-alone-{c}-{bias}-{bn}", "cpu", torch.float32, True, n=2, c=c, k=32, size=8,
                             kernel=1, stride=2, bn=bn, bias=bias, layout="channels_last")
        ref = sample.cast(torch.float64)
        if getattr(sample, alone) is None:
            continue
        out, expected = ops.conv_bn_act(**sample.kwargs()), reference(**ref.kwargs())
        grad_out = torch.randn(out.shape, dtype=torch.float64)
        grad, = torch.autograd.grad(out, [getattr(sample, alone)], grad_out.float())
        truth, = torch.autograd.grad(expected, [getattr(ref, alone)], grad_out)
        scale = torch.ones_like(truth) if alone == "bias" and bn == "train" else None  # BN cancels it: 0
        assert_close_scaled(grad, truth, TOLERANCES[torch.float32], f"{alone} alone, c={c} bias={bias} bn={bn}",
                            scale)


def test_strided_pointwise_gradients_alone_on_one_thread():
    run = subprocess.run([sys.executable, "-c", "from tests.test_ops import pointwise_gradients_alone_on_one_thread as "
                          "check; check()"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_running_statistics_over_several_steps(device, dtype, momentum):
    """Three training steps on fresh batches from num_batches_tracked = 0: running
    statistics follow nn.BatchNorm2d (momentum=None: the cumulative average of the batches)."""
    sample = make_sample(f"steps-{momentum}", device, dtype, True, n=3, k=4, size=5, bias=True, momentum=momentum)
    sample.num_batches_tracked.zero_()
    ref = sample.cast(torch.float64)
    for step in range(3):
        if step:  # a fresh batch with another mean and variance
            batch = torch.randn(sample.input.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            sample.input = (batch * (1 + step) + step).to(device, dtype).requires_grad_()
            ref.input = sample.input.detach().double().requires_grad_()
        assert_matches_native(sample, ref, seed=step)
    assert sample.num_batches_tracked.item() == 3


@pytest.mark.parametrize("case", ["gamma0", "gamma1e-9", "slope0", "slope0-gamma0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_recompute_fallback_matches_native(device, dtype, case):
    """Training-mode gradients where the normalised conv output cannot be recovered from the
    output (a BN weight of exactly 0 or ~0: recomputed for that channel only; slope 0: for
    all channels) match native. Recovering through 1 / gamma = inf would give NaN instead."""
    gamma = {"gamma0": [0.0, 0.8, -1.2, 0.6], "gamma1e-9": [0.9, 1e-9, -1.1, 0.7], "slope0": None,
             "slope0-gamma0": [0.0, 0.8, -1.2, 0.6]}[case]
    sample = make_sample(f"fallback-{case}", device, dtype, True, n=4, c=5, k=4, size=8, bias=True,
                         residual=True, gamma=gamma, slope=0.0 if case.startswith("slope0") else 0.01)
    assert_matches_native(sample, sample.cast(torch.float64))


# --- 4. bad inputs ---------------------------------------------------------------------------
BAD_INPUTS = {  # label: (change to a valid call's arguments, exception, distinctive part of its message)
    "3d-input": (lambda a: {"input": a["input"][0]}, RuntimeError, r"expected a 4-D input \(N, C, H, W\), got 3-D"),
    "channel-mismatch": (lambda a: {"weight": a["weight"][:, :2]}, RuntimeError,
                         "input has 3 channels but the conv weight expects 2"),
    "weight-dtype": (lambda a: {"weight": a["weight"].double()}, RuntimeError,
                     "weight has dtype Double but input has dtype Float"),
    "integer-input": (lambda a: {"input": a["input"].long()}, RuntimeError, "input must be floating point"),
    "float16-on-cpu": (lambda a: {n: a[n].half() for n in ("input", "weight", "bias", "residual")}, RuntimeError,
                       "float16 is supported on CUDA only"),
    "bn-weight-length": (lambda a: {"bn_weight": a["bn_weight"][:3]}, RuntimeError,
                         r"bn_weight must have shape \(4,\)"),
    "bn-bias-missing": (lambda a: {"bn_bias": None}, RuntimeError, "bn_weight and bn_bias must be given together"),
    "running-mean-length-eval": (lambda a: {"running_mean": a["running_mean"][:3], "training": False},
                                 RuntimeError, r"running_mean must have shape \(4,\)"),
    "running-mean-length-train": (lambda a: {"running_mean": a["running_mean"][:3]}, RuntimeError,
                                  r"running statistics of shape \[3\] and \[4\] do not match batch statistics of "
                                  r"shape \[4\]"),
    "tracked-missing": (lambda a: {"num_batches_tracked": None}, ValueError,
                        "needs running_var and num_batches_tracked too"),
    "residual-shape": (lambda a: {"residual": a["residual"][:, :, 1:]}, RuntimeError,
                       r"residual must have the conv output's shape \[2, 4, 6, 6\], got \[2, 4, 5, 6\]"),
    "residual-dtype": (lambda a: {"residual": a["residual"].double()}, RuntimeError,
                       "residual has dtype Double but input has dtype Float"),
    "smaller-than-kernel": (lambda a: {"input": a["input"][..., :2, :2], "padding": 0, "residual": None},
                            RuntimeError, "input of spatial size 2x2 with padding 0 is smaller than the 3x3 kernel"),
    "negative-slope": (lambda a: {"negative_slope": -0.1}, RuntimeError, "negative_slope must be finite and >= 0"),
    "stride-0": (lambda a: {"stride": 0}, RuntimeError, "stride must be >= 1, got 0"),
    "eps-0": (lambda a: {"eps": 0.0}, RuntimeError, "eps must be > 0"),
    "momentum-above-1": (lambda a: {"momentum": 1.5}, RuntimeError, r"momentum must be in \[0, 1\], got 1.5"),
}


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_input_raises(label):
    """A bad call raises with a message naming the problem, and leaves the BN buffers untouched."""
    change, error, message = BAD_INPUTS[label]
    sample = make_sample("bad", "cpu", residual=True, bias=True)
    args = sample.kwargs()
    buffers = [args[name].clone() for name in BN_BUFFERS]
    with pytest.raises(error, match=message):
        ops.conv_bn_act(**{**args, **change(args)})
    for name, before in zip(BN_BUFFERS, buffers):
        assert torch.equal(args[name], before), name


@requires_cuda
@pytest.mark.parametrize("name", ["weight", "bn_weight", "residual"])
def test_device_mismatch_raises(name):
    """A CPU tensor in a CUDA call is named in the error, not read as device memory."""
    sample = make_sample("device", "cuda", residual=True)
    setattr(sample, name, getattr(sample, name).cpu())
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but input is on cuda"):
        ops.conv_bn_act(**sample.kwargs())


@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_channel(device):
    """Training on a single value per channel (N=1, 1x1 output) fails with native's message;
    eval mode accepts it and matches native."""
    sample = make_sample("one-value", device, n=1, size=1, kernel=1)
    message = "Expected more than 1 value per channel when training"
    with pytest.raises(RuntimeError, match=message):
        ops.conv_bn_act(**sample.kwargs())
    with pytest.raises(ValueError, match=message):
        reference(**sample.cast(torch.float32).kwargs())
    sample.training = False
    torch.testing.assert_close(ops.conv_bn_act(**sample.kwargs()), reference(**sample.kwargs()))


NONFINITE = {  # label: (make_sample options, the tensor poisoned, its value)
    "nan-input-train": ({}, "input", float("nan")),
    "nan-input-eval": ({"bn": "eval"}, "input", float("nan")),
    "nan-input-no-bn": ({"bn": "none"}, "input", float("nan")),
    "inf-input-eval": ({"bn": "eval"}, "input", float("inf")),
    "inf-input-train": ({}, "input", float("inf")),
    # a 1x1 conv makes the conv output +-inf in one element per channel: a channel's mean is
    # +-inf and its variance NaN
    "inf-input-train-1x1": ({"kernel": 1}, "input", float("inf")),
    "nan-residual-train": ({}, "residual", float("nan")),
    "nan-bn-weight-train": ({}, "bn_weight", float("nan")),
}


@pytest.mark.parametrize("label", list(NONFINITE))
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_values_propagate_like_native(device, label):
    """NaN/Inf give NaN and +-Inf exactly where native gives them (training BN spreads a NaN
    to whole channels) and the same running statistics."""
    options, name, value = NONFINITE[label]
    sample = make_sample(label, device, residual=True, **options)
    poisoned = getattr(sample, name)
    poisoned.view(-1)[1] = value
    ref = sample.cast(torch.float32)
    out, expected = ops.conv_bn_act(**sample.kwargs()), reference(**ref.kwargs())
    assert (out.isnan() | out.isinf()).any()
    for kind in ("isnan", "isposinf", "isneginf"):
        mask, native_mask = getattr(out, kind)(), getattr(expected, kind)()
        same = torch.equal(mask, native_mask)
        assert same, f"{kind}: true at {mask.sum()} elements, native at {native_mask.sum()} of {out.numel()}"
    torch.testing.assert_close(out, expected, equal_nan=True)
    for buffer in BN_BUFFERS:
        if getattr(sample, buffer) is not None:
            torch.testing.assert_close(getattr(sample, buffer), getattr(ref, buffer), equal_nan=True,
                                       msg=lambda m, b=buffer: f"{b}: {m}")


def test_concurrent_backwards_match_serial():
    """Backwards running at once on two threads (each of the CPU backward's temporaries its own
    memory, cpu/reusable_buffer.h) give the bits each gives alone, call after call."""
    labels = ["train-residual-channels_last", "eval-residual-channels_last"]
    samples = [get_sample(label, "cpu", requires_grad=True, n=4, c=8, k=16, size=12) for label in labels]

    def gradients(sample: Sample) -> list[Tensor]:
        out = ops.conv_bn_act(**sample.kwargs())
        grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
        return list(torch.autograd.grad(out, list(sample.grad_inputs().values()), grad_out))

    serial = [gradients(s) for s in samples]
    results: dict[int, list[list[Tensor]]] = {0: [], 1: []}

    def worker(i: int) -> None:
        for _ in range(20):
            results[i].append(gradients(samples[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(results[i]) == 20, f"thread {i} failed"
        for call in results[i]:
            assert all(torch.equal(a, b) for a, b in zip(call, serial[i], strict=True)), labels[i]
