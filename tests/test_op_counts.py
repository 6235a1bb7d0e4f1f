"""dispatch_counts (vggbench/bench/op_counts.py): which ops a step dispatches that do work, on native
layers whose ops are known, on views and copies, on recorded scopes, and on the fused unit."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from vggbench.bench.op_counts import PHASES, dispatch_counts, unit_counts

NATIVE_FORWARD = {"aten::conv2d": 1, "aten::batch_norm": 1, "aten::add": 1, "aten::leaky_relu": 1}


@pytest.fixture
def native_unit() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Conv2d -> BatchNorm2d (training) and channels_last input and residual."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    residual = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    return conv, bn, x, residual


def test_native_forward_counts_each_top_level_op_once(native_unit) -> None:
    conv, bn, x, residual = native_unit
    counts = dispatch_counts(lambda: F.leaky_relu(bn(conv(x)) + residual, 0.01))
    # aten::add_ is BatchNorm2d's num_batches_tracked += 1; the conv's and BN's inner ops
    # (aten::convolution, native_batch_norm, their empty outputs) are not counted again
    assert counts == collections.Counter({**NATIVE_FORWARD, "aten::add_": 1})
    bn.eval()
    with torch.no_grad():
        assert dispatch_counts(lambda: F.leaky_relu(bn(conv(x)) + residual, 0.01)) == collections.Counter(
            NATIVE_FORWARD)


def test_backward_counts_inside_autograds_wrappers(native_unit) -> None:
    conv, bn, x, residual = native_unit
    out = F.leaky_relu(bn(conv(x)) + residual, 0.01)
    grad = torch.ones_like(out)
    counts = dispatch_counts(lambda: torch.autograd.grad(out, [x, conv.weight, bn.weight, bn.bias], grad))
    # AddBackward0 passes the gradient on without an op
    assert counts == collections.Counter({"aten::leaky_relu_backward": 1, "aten::native_batch_norm_backward": 1,
                                          "aten::convolution_backward": 1})


def test_views_count_nothing_and_copies_count_their_copy() -> None:
    x = torch.randn(4, 6)
    assert dispatch_counts(lambda: x.view(2, 12).t().unsqueeze(0).expand(3, 12, 2)[1].reshape(12, 2)) == {}
    assert dispatch_counts(lambda: (x.contiguous(), x.to(torch.float32), torch.empty_like(x))) == {}
    assert dispatch_counts(lambda: x.t().contiguous()) == {"aten::clone": 1}
    assert dispatch_counts(lambda: x.t().reshape(-1)) == {"aten::clone": 1}  # a transposed tensor cannot be viewed flat
    assert dispatch_counts(lambda: x.to(torch.float64)) == {"aten::_to_copy": 1}


def test_scopes_recorded_by_the_extension_count_once_and_others_count_inside() -> None:
    x = torch.randn(4, 6)

    def step() -> None:
        with record_function("vggbench::cpu::a_pass"):  # as RECORD_FUNCTION in the extension's kernels
            (x * 2).sum()
        with record_function("user scope"):
            x.exp()

    assert dispatch_counts(step) == {"vggbench::cpu::a_pass": 1, "aten::exp": 1}


def test_unit_counts_native_and_fused() -> None:
    native, fused = unit_counts("native"), unit_counts("fused")
    assert set(native) == set(fused) == set(PHASES)
    assert native["forward"] == collections.Counter({**NATIVE_FORWARD, "aten::add_": 1})
    assert native["eval"] == collections.Counter(NATIVE_FORWARD)
    assert native["backward"] == collections.Counter(
        {"aten::leaky_relu_backward": 1, "aten::native_batch_norm_backward": 1, "aten::convolution_backward": 1})
    for phase, counts in fused.items():
        # the fused op is expanded into what it calls, its passes counted
        assert "vggbench::conv_bn_act" not in counts and any(name.startswith("vggbench::") for name in counts), phase


def test_unit_counts_names_the_implementations() -> None:
    with pytest.raises(ValueError, match=r"impl must be one of \('native', 'fused'\), got 'eager'"):
        unit_counts("eager")
