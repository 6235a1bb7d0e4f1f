"""The CPU's Winograd convs on every instruction-set path this CPU supports (AVX2+FMA,
AVX-512): accuracy against float64 relative to native's in float32 and bfloat16, the same
bits on every path and thread count, the fused unit's convs on them (not ATen's), the
forced-AVX2 switch (VGGBENCH_CPU_ISA) in a process of its own, and the errors for bad
inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.helpers import CPU_FLAGS
from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.bench.scaling import torch_threads

ROOT = Path(__file__).resolve().parent.parent
WIDEST = torch.ops.vggbench.winograd_isa()
# the paths this CPU supports, narrowest first (AVX-512 CPUs have AVX2 too)
ISAS = {"none": [], "avx2": ["avx2"], "avx512": ["avx2", "avx512"]}[WIDEST]
# (N, C, K, H): partial edge tiles (5, 9, 13), channel counts that fill 8-float registers
# but not 16-float ones (8, 24: AVX-512 falls back to its AVX2 kernels), the study's 32
SHAPES = [(3, 8, 16, 9), (2, 16, 24, 5), (4, 32, 32, 16), (8, 32, 32, 8), (2, 48, 32, 13)]
# Floor of the relative error: the transforms round each of the 36 points a few times with
# coefficients up to 8, a few float32 ulps whatever the sum's length, while native's error
# shrinks on short sums.
FLOOR = 8 * torch.finfo(torch.float32).eps


def channels_last(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).contiguous(memory_format=torch.channels_last)


def operands(n: int, c: int, k: int, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (N, C, H, H), weight (K, C, 3, 3) scaled to keep activations O(1), bias (K,), and an
    output gradient (N, K, H, H); seeded by the shape."""
    seed = n * 1000003 + c * 1009 + k * 31 + h
    x = channels_last(n, c, h, h, seed=seed)
    weight = torch.randn(k, c, 3, 3, generator=torch.Generator().manual_seed(seed + 1)) / (9 * c) ** 0.5
    bias = torch.randn(k, generator=torch.Generator().manual_seed(seed + 2))
    return x, weight, bias, channels_last(n, k, h, h, seed=seed + 3)


# Each conv computed three ways: (fused on `isa`, native float32, float64 truth).
def forward(x: Tensor, w: Tensor, b: Tensor, gy: Tensor) -> tuple[Callable[[str], Tensor], Callable[..., Tensor]]:
    return (lambda isa: torch.ops.vggbench.winograd_conv(x, w, b, False, isa),
            lambda dt: F.conv2d(x.to(dt), w.to(dt), b.to(dt), padding=1))


def input_grad(x: Tensor, w: Tensor, b: Tensor, gy: Tensor) -> tuple[Callable[[str], Tensor], Callable[..., Tensor]]:
    return (lambda isa: torch.ops.vggbench.winograd_conv(gy, w, None, True, isa),
            lambda dt: torch.nn.grad.conv2d_input(x.shape, w.to(dt), gy.to(dt), padding=1))


def weight_grad(x: Tensor, w: Tensor, b: Tensor, gy: Tensor) -> tuple[Callable[[str], Tensor], Callable[..., Tensor]]:
    return (lambda isa: torch.ops.vggbench.winograd_weight_grad(x, gy, isa),
            lambda dt: torch.nn.grad.conv2d_weight(x.to(dt), w.shape, gy.to(dt), padding=1))


CONVS = {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad}


def relative_error(value: Tensor, truth: Tensor) -> float:
    return ((value.double() - truth).norm() / truth.norm()).item()


def cpu_widest() -> str:
    """The widest path the CPU's flags allow (AVX-512 on any AVX2+FMA CPU for the emulated
    AVX-512 build, which tests/test_build.py runs these tests on with
    VGGBENCH_TEST_EMULATED_AVX512=1)."""
    emulated = os.environ.get("VGGBENCH_TEST_EMULATED_AVX512") == "1"
    if {"avx2", "fma"} <= CPU_FLAGS and (emulated or {"avx512f", "avx512bw", "avx512vl"} <= CPU_FLAGS):
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= CPU_FLAGS else "none"


def test_widest_path_is_the_cpus() -> None:
    """Unforced, the kernels use the widest instruction set the CPU has."""
    assert WIDEST == (os.environ.get("VGGBENCH_CPU_ISA") or cpu_widest())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-C{}-K{}-H{}".format(*s))
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64_like_native(isa: str, conv: str, shape: tuple[int, int, int, int]) -> None:
    """Relative error against float64 within 4x native float32's on the same data (+ FLOOR)."""
    fused, native = CONVS[conv](*operands(*shape))
    truth = native(torch.float64)
    native_error = relative_error(native(torch.float32), truth)
    out = fused(isa)
    assert out.dtype == torch.float32 and out.shape == truth.shape
    assert relative_error(out, truth) <= 4 * native_error + FLOOR


@pytest.mark.parametrize("isa", ISAS)
def test_weights_of_any_layout_give_the_same_bits(isa: str) -> None:
    """The weight transform reads the weight through its strides (no copy): a channels_last or
    a strided weight gives the bits of a contiguous one, forward and input gradient; the
    weight gradient comes back channels_last, the layout the fused unit returns it in."""
    x, w, b, gy = operands(2, 16, 24, 5)
    layouts = {"channels_last": w.contiguous(memory_format=torch.channels_last),
               "strided": w.transpose(2, 3).contiguous().transpose(2, 3)}
    for transposed, inp, bias in ((False, x, b), (True, gy, None)):
        want = torch.ops.vggbench.winograd_conv(inp, w, bias, transposed, isa)
        for name, weight in layouts.items():
            got = torch.ops.vggbench.winograd_conv(inp, weight, bias, transposed, isa)
            assert torch.equal(got, want), (name, transposed)
    assert torch.ops.vggbench.winograd_weight_grad(x, gy, isa).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-C{}-K{}-H{}".format(*s))
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_matches_float64_like_native(isa: str, conv: str, shape: tuple[int, int, int, int]) -> None:
    """bfloat16 operands: float32 transforms and products, the output rounded once, as native
    bfloat16 rounds its float32 sums once; that rounding (2^-9 relative) dwarfs float32's
    error, so the two round nearly every entry alike: the relative error against float64 (on
    the same bfloat16 values) is within 1.25x native bfloat16's."""
    x, w, b, gy = (t.to(torch.bfloat16) for t in operands(*shape))
    fused, native = CONVS[conv](x, w, b, gy)
    truth = native(torch.float64)
    native_error = relative_error(native(torch.bfloat16), truth)
    out = fused(isa)
    assert out.dtype == torch.bfloat16 and out.shape == truth.shape
    assert relative_error(out, truth) <= 1.25 * native_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", CONVS)
def test_same_bits_on_every_path_and_thread_count(conv: str, dtype: torch.dtype) -> None:
    """Each lane does the same operations in the same order on every path, and sums run over
    fixed runs of tiles in order: the results are bitwise the same for any path and thread
    count. (N=100 at 8x8: the study's smallest maps, 23 blocks of tiles.)"""
    fused, _ = CONVS[conv](*(t.to(dtype) for t in operands(100, 32, 32, 8)))
    with torch_threads(1):
        expected = fused("avx2")
    for isa in ISAS:
        for count in (1, 2, 3):
            with torch_threads(count):
                assert torch.equal(fused(isa), expected), (isa, count)


def batch_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance."""
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    return mean, var


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2+FMA: the kernels do not run")
@pytest.mark.parametrize("offset", [0.0, 40.0], ids=["centred", "offset"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-C{}-K{}-H{}".format(*s))
def test_batch_statistics_taken_in_the_conv(shape: tuple[int, int, int, int], offset: float) -> None:
    """The fused unit's training forward takes BN's batch statistics from the Winograd conv's
    output as it is written (_conv_stats, the forward's first half): z is the conv's, bit for
    bit; mean and variance are as close to float64's as native float32's (conv, then
    var_mean) within 4x (+ FLOOR), also when |mean| >> std (offset inputs: the sums run from a
    shift near the mean); and bitwise the same for any thread count."""
    x, w, b, _ = operands(*shape)
    x = (x + offset).contiguous(memory_format=torch.channels_last)
    with torch_threads(1):
        z, mean, var = torch.ops.vggbench._conv_stats(x, w, b, 1, 1)
    assert torch.equal(z, torch.ops.vggbench.winograd_conv(x, w, None, False, WIDEST))
    truth = batch_stats(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    native = batch_stats(F.conv2d(x, w, b, padding=1))
    scale = truth[1].sqrt()  # errors in units of each channel's standard deviation; the variance's relative
    for name, fused, reference, true, unit in (("mean", mean, native[0], truth[0], scale),
                                              ("var", var, native[1], truth[1], truth[1])):
        fused_error = ((fused.double() - true).abs() / unit).max().item()
        native_error = ((reference.double() - true).abs() / unit).max().item()
        assert fused_error <= 4 * native_error + FLOOR, (name, fused_error, native_error)
    for count in (2, 3):
        with torch_threads(count):
            again = torch.ops.vggbench._conv_stats(x, w, b, 1, 1)
        assert all(torch.equal(a, e) for a, e in zip(again, (z, mean, var))), count


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(ROOT)} | env, check=False)


# A BN+residual unit's training step (forward, backward) through the fused op, and the entry
# unit's (3 -> 32 channels, 8x8: the entry kernels' direct conv and weight gradient on every
# path): saves the outputs and gradients to $RESULT and prints the paths in use.
UNIT_STEP = """
import json, os, torch, vggbench
from vggbench import ops
gen = torch.Generator().manual_seed(0)
cl = lambda *s: torch.randn(*s, generator=gen).contiguous(memory_format=torch.channels_last)
x, res = cl(8, 32, 12, 12).requires_grad_(), cl(8, 32, 12, 12)
w = (torch.randn(32, 32, 3, 3, generator=gen) / 17).requires_grad_()
gamma, beta = torch.rand(32, generator=gen).add(0.5).requires_grad_(), torch.randn(32, generator=gen)
out = ops.conv_bn_act(x, w, None, gamma, beta, residual=res, padding=1, training=True)
grads = torch.autograd.grad(out, [x, w, gamma], cl(8, 32, 12, 12))
images, entry_w = cl(8, 3, 8, 8), (torch.randn(32, 3, 3, 3, generator=gen) / 5).requires_grad_()
entry_out = ops.conv_bn_act(images, entry_w, None, gamma, beta, padding=1, training=True)
entry_grads = torch.autograd.grad(entry_out, [entry_w, gamma], cl(8, 32, 8, 8))
torch.save([out.detach(), *grads, entry_out.detach(), *entry_grads], os.environ["RESULT"])
print(json.dumps({"winograd": torch.ops.vggbench.winograd_isa(), "aten": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2+FMA: the kernels do not run")
def test_forced_avx2_process_gives_the_same_unit_results(tmp_path: Path) -> None:
    """VGGBENCH_CPU_ISA=avx2 (with ATen and oneDNN held to AVX2 too, as on an AVX2-only CPU):
    the fused unit's training step runs on the AVX2 kernels (Winograd and the BN/activation
    passes) and gives the same bits as the default (widest) path of this process."""
    forced = run_python(UNIT_STEP, RESULT=str(tmp_path / "avx2.pt"), VGGBENCH_CPU_ISA="avx2",
                        ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout.splitlines()[-1]) == {"winograd": "avx2", "aten": "AVX2"}
    default = run_python(UNIT_STEP, RESULT=str(tmp_path / "default.pt"), VGGBENCH_CPU_ISA="")
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout.splitlines()[-1])["winograd"] == cpu_widest()
    for a, b in zip(torch.load(tmp_path / "avx2.pt"), torch.load(tmp_path / "default.pt"), strict=True):
        assert torch.equal(a, b)


# The ATen convs a fused BN+residual unit's training step and eval forward call (3x3,
# $CHANNELS channels, 8x8 maps) in $LAYOUT, under CPU autocast to $DTYPE (float32: no autocast), and
# whether a batch-statistics pass ran (not with the Winograd conv, which takes them as it
# writes its output), printed as a JSON list.
UNIT_CONVS = """
import json, os, torch
from vggbench import ops
dtype, fmt = getattr(torch, os.environ["DTYPE"]), getattr(torch, os.environ["LAYOUT"])
c = int(os.environ["CHANNELS"])
gen = torch.Generator().manual_seed(0)
act = lambda: torch.randn(4, c, 8, 8, generator=gen).contiguous(memory_format=fmt)
x, res, grad_out = act().requires_grad_(), act(), act()
w = (torch.randn(c, c, 3, 3, generator=gen) / 17).requires_grad_()
gamma, beta = torch.rand(c, generator=gen).add(0.5).requires_grad_(), torch.randn(c, generator=gen)
ops.RECOMPUTE = "all"  # the backward's recompute of xhat runs the whole conv too
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \\
        torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
    out = ops.conv_bn_act(x, w, None, gamma, beta, residual=res, padding=1, training=True)
    torch.autograd.grad(out, [x, w, gamma], grad_out.to(out.dtype))
    ops.conv_bn_act(x, w, None, gamma, beta, torch.zeros(c), torch.ones(c), residual=res, padding=1,
                    training=False)
convs = {"aten::convolution", "aten::convolution_backward", "vggbench::cpu::batch_stats"}
print(json.dumps(sorted({event.name for event in prof.events()} & convs)))
"""
ATEN_CONVS = ["aten::convolution", "aten::convolution_backward", "vggbench::cpu::batch_stats"]
AVX2_CPU = {"VGGBENCH_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2+FMA: the kernels do not run")
@pytest.mark.parametrize(("dtype", "env", "on_winograd"), [
    ("float32", {}, True),
    # bfloat16: these kernels, unless ATen's bfloat16 convs run on AMX tiles (several times faster)
    ("bfloat16", {"ONEDNN_MAX_CPU_ISA": ""}, "amx_bf16" not in CPU_FLAGS),
    ("bfloat16", AVX2_CPU, True),  # as on an AVX2-only CPU
    ("bfloat16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),  # oneDNN without AMX
], ids=["float32", "bfloat16", "bfloat16-avx2", "bfloat16-no-amx"])
def test_fused_unit_convs_run_on_winograd(dtype: str, env: dict[str, str], on_winograd: bool) -> None:
    """The fused unit's forward (with its batch statistics), input- and weight-gradient convs
    all run on these kernels where they apply, channels_last or contiguous (through
    channels_last copies); 12 channels (not a multiple of 8) go through ATen and a statistics
    pass (which shows the profile would see them)."""
    for layout in ("channels_last", "contiguous_format"):
        for channels, expected in ((32, [] if on_winograd else ATEN_CONVS), (12, ATEN_CONVS)):
            result = run_python(UNIT_CONVS, DTYPE=dtype, LAYOUT=layout, CHANNELS=str(channels), **env)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout.splitlines()[-1]) == expected, (layout, channels)


# The 3->32 entry unit's training step under CPU autocast to bfloat16 (N=4, 16x16, ATen's
# conv: 3 channels): the dtypes ATen's conv and conv backward got, and the relative-norm
# errors of the output and of the input and weight gradients against the native chain in
# float64 on the same bfloat16 values, printed as JSON.
ENTRY_BF16 = """
import json, torch
import torch.nn.functional as F
from vggbench import ops
gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 3, 16, 16, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
w, gamma = torch.randn(32, 3, 3, 3, generator=gen).bfloat16() / 5, torch.rand(32, generator=gen).add(0.5)
beta, grad_out = torch.randn(32, generator=gen), torch.randn(4, 32, 16, 16, generator=gen).bfloat16()
x.requires_grad_(), w.requires_grad_()
def native(x, w, gamma, beta):
    return F.leaky_relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, gamma, beta, training=True), 0.01)
def errors(out, grads):  # relative-norm errors against float64
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out64 = native(x64, w64, gamma.double(), beta.double())
    expected = [out64, *torch.autograd.grad(out64, [x64, w64], grad_out.double())]
    return [((a.double() - e).norm() / e.norm()).item() for a, e in zip([out, *grads], expected, strict=True)]
with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
    out = ops.conv_bn_act(x, w, None, gamma, beta, padding=1, training=True)
    grads = torch.autograd.grad(out, [x, w], grad_out)
dtypes = sorted({str(e.input_dtypes[0]) for e in prof.events() if e.name.startswith("aten::convolution")})
with torch.autocast("cpu", dtype=torch.bfloat16):
    out_native = native(x, w, gamma, beta)
    native_errors = errors(out_native, torch.autograd.grad(out_native, [x, w], grad_out))
print(json.dumps({"dtypes": dtypes, "fused": errors(out, grads), "native": native_errors,
                  "dot_products": torch.ops.vggbench.native_bf16_dot_products()}))
"""


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2+FMA: the kernels do not run")
@pytest.mark.parametrize(("env", "widened"), [
    ({"ONEDNN_MAX_CPU_ISA": ""}, not CPU_FLAGS & {"avx512_bf16", "amx_bf16"}),
    (AVX2_CPU, True),  # as on an AVX2-only CPU: ATen's bfloat16 conv is a direct one there
    *([({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, True)] if "avx512f" in CPU_FLAGS else []),  # no AVX512-BF16
], ids=lambda value: value if isinstance(value, bool) else "-".join(value.values()) or "default")
def test_bfloat16_aten_convs_run_in_float32_without_bf16_dot_products(env: dict[str, str], widened: bool) -> None:
    """A bfloat16 conv the Winograd kernels do not take (the 3-channel entry conv) goes through
    ATen in float32 where ATen's bfloat16 conv would lack bfloat16 dot products (10-18x slower
    than float32 on an AVX2 CPU), else in bfloat16; either way the output and the input and
    weight gradients stay within 1.5x native bfloat16's own error against float64 (plus one
    bfloat16 unit roundoff, 2^-8: both are about that size, and differ by where they round).
    torch.ops.vggbench.native_bf16_dot_products() says which case it is."""
    result = run_python(ENTRY_BF16, **env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["dtypes"] == ["float" if widened else "c10::BFloat16"]
    assert found["dot_products"] is not widened  # what the benchmark report records as the bf16 target's condition
    for fused, native in zip(found["fused"], found["native"], strict=True):
        assert fused <= 1.5 * native + 2**-8, found


@pytest.mark.parametrize(("value", "message"), [
    ("sse2", "VGGBENCH_CPU_ISA must be avx2 or avx512 (or unset: the widest this CPU has), got 'sse2'"),
    *([("avx512", "VGGBENCH_CPU_ISA=avx512: this CPU lacks it")] if cpu_widest() == "avx2" else []),
])
def test_bad_isa_switch_is_a_clear_error(value: str, message: str) -> None:
    result = run_python("import torch, vggbench.ops; torch.ops.vggbench.winograd_isa()", VGGBENCH_CPU_ISA=value)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2+FMA: the kernels do not run")
@pytest.mark.parametrize(("call", "message"), [
    (lambda x, w: torch.ops.vggbench.winograd_conv(x, w, None, False, "sse"), "isa must be avx2 or avx512, got 'sse'"),
    (lambda x, w: torch.ops.vggbench.winograd_conv(x.contiguous(), w, None, False, "avx2"),
     "x must be a non-empty float32 or bfloat16 CPU tensor (N, C, H, W), channels_last"),
    (lambda x, w: torch.ops.vggbench.winograd_conv(x.bfloat16(), w, None, False, "avx2"),
     "weight must be of x's dtype"),
    (lambda x, w: torch.ops.vggbench.winograd_conv(x, w[:, :8], None, False, "avx2"), "with C = x's 16 channels"),
    (lambda x, w: torch.ops.vggbench.winograd_conv(x, w, torch.zeros(3), False, "avx2"),
     "bias must be of x's dtype and shape (8)"),
    (lambda x, w: torch.ops.vggbench.winograd_weight_grad(x, x[:1], "avx2"), "must have the same N, H, W and dtype"),
    (lambda x, w: torch.ops.vggbench.winograd_weight_grad(x, x.bfloat16(), "avx2"),
     "must have the same N, H, W and dtype"),
])
def test_bad_inputs_are_clear_errors(call: Callable[[Tensor, Tensor], Tensor], message: str) -> None:
    x, w = channels_last(2, 16, 5, 5, seed=0), torch.randn(8, 16, 3, 3)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(x, w)
