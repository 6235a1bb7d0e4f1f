"""Guards of the fused op: what FusedConvNormAct refuses, the checks of every op entry point,
empty batches, devices (meta), and autocast's output dtype and layout against native."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_ops import BN_BUFFERS, make_sample, reference
from vggbench import ops
from vggbench.models import ConvNormAct, unit_for

FusedConvNormAct = unit_for("fused")


def twins(**kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    native = ConvNormAct(8, 8, **kwargs)
    fused = FusedConvNormAct(8, 8, **kwargs)
    fused.load_state_dict(native.state_dict())
    return native, fused


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def set_attr(path: str, value):
    def change(unit):
        owner, _, name = path.rpartition(".")
        setattr(unit.get_submodule(owner) if owner else unit, name, value)
    return change


UNFUSABLE = {  # label: (change to a fused unit after construction, the attribute the error names)
    "dilation": (set_attr("conv.dilation", (2, 2)), r"conv\.dilation=\(2, 2\)"),
    "groups": (set_attr("conv", nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)), "conv.groups=2"),
    "padding-mode": (set_attr("conv.padding_mode", "reflect"), "conv.padding_mode='reflect'"),
    "stride-not-square": (set_attr("conv.stride", (1, 2)), r"conv\.stride=\(1, 2\)"),
    "padding-not-square": (set_attr("conv.padding", (1, 0)), r"conv\.padding=\(1, 0\)"),
    "padding-same": (set_attr("conv.padding", "same"), "conv.padding='same'"),
    "conv-subclass": (set_attr("conv", ScaledConv(8, 8, 3, padding=1)), "conv is a ScaledConv"),
    "conv-hook": (lambda u: u.conv.register_forward_hook(lambda *a: None), "conv has forward hooks"),
    "bn-affine": (set_attr("bn", nn.BatchNorm2d(8, affine=False)), "bn.affine=False"),
    "bn-weight-none": (set_attr("bn.weight", None), "bn.affine=False"),
    "bn-identity": (set_attr("bn", nn.Identity()), "bn is a Identity"),
    "bn-torch-sync": (set_attr("bn", nn.SyncBatchNorm(8)), "bn is a SyncBatchNorm"),
    "bn-none": (set_attr("bn", None), "bn is None but norm='before'"),
    "bn-eps-tensor": (set_attr("bn.eps", torch.tensor(1e-5)), "bn.eps=tensor"),
    "bn-momentum-tensor": (set_attr("bn.momentum", torch.tensor(0.1)), "bn.momentum=tensor"),
    "bn-momentum-above-1": (set_attr("bn.momentum", 2.0), "bn.momentum=2.0"),
    "activation": (set_attr("activation", "sigmoid"), "activation='sigmoid'"),
    "norm-after": (set_attr("norm", "after"), "norm='after'"),
    "slope": (set_attr("negative_slope", -0.5), "negative_slope=-0.5"),
}


@pytest.mark.parametrize("label", list(UNFUSABLE))
def test_fused_unit_refuses_what_it_does_not_compute(label):
    """A conv or BN changed after construction is refused at forward, naming the attribute
    (silently computing it would give another result than native: e.g. dilation 2)."""
    change, attribute = UNFUSABLE[label]
    _, fused = twins()
    fused(torch.randn(2, 8, 9, 9))  # fusable as built
    change(fused)
    with pytest.raises(ValueError, match=f"FusedConvNormAct: {attribute}.*--impl native"):
        fused(torch.randn(2, 8, 9, 9))


@pytest.mark.parametrize("train", [True, False])
def test_bn_without_running_statistics_matches_native(train):
    """track_running_stats=False (and the buffers kept but not tracked) follows nn.BatchNorm2d."""
    for drop_buffers in (True, False):
        native, fused = twins()
        for unit in (native, fused):
            unit.bn.track_running_stats = False
            if drop_buffers:
                unit.bn.running_mean = unit.bn.running_var = unit.bn.num_batches_tracked = None
            unit.train(train)
        x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
        native.double(), fused.double()
        torch.testing.assert_close(fused(x), native(x))
        torch.testing.assert_close(fused.state_dict(), native.state_dict())


def test_unit_without_norm_ignores_a_bn_attribute_like_native():
    native, fused = twins(norm=None)
    for unit in (native, fused):
        unit.bn = nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(fused(x), native(x))


def test_meta_running_statistics_in_eval_raise_like_native():
    """The Meta dispatch key wins over CPU: the fake kernel must refuse, not return garbage."""
    sample = make_sample("meta", "cpu", bn="eval")
    sample.running_mean = sample.running_mean.to("meta")
    with pytest.raises(RuntimeError, match="running_mean is on meta but input is on cpu"):
        ops.conv_bn_act(**sample.kwargs())
    with pytest.raises(RuntimeError):
        reference(**sample.kwargs())


def op_arguments():
    """Valid arguments of each internal op entry point, from one real forward."""
    sample = make_sample("entry", "cpu", residual=True, bias=True)
    args = sample.op_args()
    input, weight, bias, bn_weight, bn_bias, _, _, residual, stride, padding, _, eps, slope = args
    out, mean, var = torch.ops.vggbench.conv_bn_act(*args)
    grad_out = torch.randn_like(out)
    tensors = dict(grad_out=grad_out, out=out, input=input, weight=weight, bias=bias, bn_weight=bn_weight,
                   bn_bias=bn_bias, residual=residual, mean=mean, var=var)
    sums = torch.ops.vggbench._conv_bn_act_backward_sums(*tensors.values(), stride, padding, eps, slope, False)
    return tensors, (stride, padding, eps, slope), sums


BAD_ENTRY = {  # label: (op, change, message)
    "bn-act-mean-length": ("_bn_act", {"mean": lambda t: t[:3]}, r"mean must have shape \(4,\)"),
    "bn-act-var-dtype": ("_bn_act", {"var": lambda t: t.double()}, "var has dtype Double but the activations"),
    "bn-act-residual-shape": ("_bn_act", {"residual": lambda t: t[:1]}, "residual must have the z's shape"),
    "bn-act-gamma-length": ("_bn_act", {"bn_weight": lambda t: t[:2]}, r"bn_weight must have shape \(4,\)"),
    "backward-grad-dtype": ("_conv_bn_act_backward", {"grad_out": lambda t: t.double()},
                            "grad_out has dtype Double but out has dtype Float"),
    "backward-grad-shape": ("_conv_bn_act_backward", {"grad_out": lambda t: t[:1]}, "grad_out must have the out's"),
    "backward-mean-length": ("_conv_bn_act_backward", {"mean": lambda t: t[:3]}, r"mean must have shape \(4,\)"),
    "backward-out-shape": ("_conv_bn_act_backward", {"out": lambda t: t[:, :3]}, "out must have the conv output"),
    "backward-beta-dtype": ("_conv_bn_act_backward", {"bn_bias": lambda t: t.double()},
                            "bn_bias has dtype Double"),
    "sums-var-dtype": ("_conv_bn_act_backward_sums", {"var": lambda t: t.double()}, "var has dtype Double"),
    "sums-residual-dtype": ("_conv_bn_act_backward_sums", {"residual": lambda t: t.double()},
                            "residual has dtype Double but out has dtype Float"),
}


@pytest.mark.parametrize("label", list(BAD_ENTRY))
def test_op_entry_points_check_every_tensor(label):
    op_name, change, message = BAD_ENTRY[label]
    tensors, (stride, padding, eps, slope), sums = op_arguments()
    tensors = {name: change[name](t) if name in change else t for name, t in tensors.items()}
    op = getattr(torch.ops.vggbench, op_name)
    with pytest.raises(RuntimeError, match=message):
        if op_name == "_bn_act":
            z = torch.randn_like(tensors["out"])
            op(z, tensors["mean"], tensors["var"], tensors["bn_weight"], tensors["bn_bias"], tensors["bias"],
               tensors["residual"], eps, slope)
        elif op_name == "_conv_bn_act_backward":
            op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6)
        else:
            op(*tensors.values(), stride, padding, eps, slope, False)


def test_backward_checks_the_sums_it_is_given():
    tensors, (stride, padding, eps, slope), sums = op_arguments()
    op = torch.ops.vggbench._conv_bn_act_backward
    with pytest.raises(RuntimeError, match=r"reduced_sums must have shape \(9,\)"):
        op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6, sums, sums)
    with pytest.raises(RuntimeError, match="local_sums and reduced_sums must be given together"):
        op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6, sums, None)


def test_backward_checks_the_kept_conv_output():
    tensors, (stride, padding, eps, slope), sums = op_arguments()
    op = torch.ops.vggbench._conv_bn_act_backward
    z = torch.randn_like(tensors["out"])
    with pytest.raises(RuntimeError, match="kept_z must have the out's shape"):
        op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6, kept_z=z[:1])
    with pytest.raises(RuntimeError, match="kept_z has dtype Double but out has dtype Float"):
        op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6, kept_z=z.double())
    with pytest.raises(RuntimeError, match="kept_z needs training-mode BatchNorm"):
        op(*tensors.values(), stride, padding, False, eps, slope, False, [True] * 6, kept_z=z)
    reduced = sums[:-1].clone()
    with pytest.raises(RuntimeError, match="without local_sums and reduced_sums"):
        op(*tensors.values(), stride, padding, True, eps, slope, False, [True] * 6, sums, reduced, z)


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_var": lambda t: t[:2]}, "batch_var .* must match batch_mean"),
    ({"running_var": lambda t: t[:2]}, "running statistics of shape"),
    ({"num_batches_tracked": lambda t: t.float()}, "num_batches_tracked must be a 0-d integer tensor"),
    ({"count": lambda t: t.reshape(1)}, "count must be a 0-d tensor"),
    ({"count": lambda t: t.double()}, "count must be a 0-d tensor of batch_mean's dtype Float, got Double"),
    ({"count": lambda t: None}, "give the number of values per channel"),
    ({"running_mean": lambda t: torch.zeros(8)[::2]}, "must be contiguous"),
    ({"batch_mean": lambda t: t.half(), "batch_var": lambda t: t.half()},
     "batch statistics must be float32 or float64"),
    ({"running_mean": lambda t: t.to("meta")}, "running_mean is on meta but input is on cpu"),
])
def test_update_running_stats_checks_every_tensor(change, message):
    args = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), num_batches_tracked=torch.tensor(0),
                batch_mean=torch.rand(4), batch_var=torch.rand(4), count=torch.tensor(8.0))
    args = {name: change[name](t) if name in change else t for name, t in args.items()}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.vggbench.update_running_stats_(*args.values(), 0.1)


@pytest.mark.parametrize("bn", ["train", "eval", "none"])
def test_empty_batch_matches_native(bn):
    """An empty batch gives an empty output, zero parameter gradients and, in training,
    running statistics left as they are with num_batches_tracked + 1 (as native)."""
    sample = make_sample(f"empty-{bn}", "cpu", torch.float64, True, n=1, bn=bn, residual=True, bias=True)
    sample.input = sample.input.detach()[:0].requires_grad_()
    sample.residual = sample.residual.detach()[:0].requires_grad_()
    ref = sample.cast(torch.float64)
    out, expected = ops.conv_bn_act(**sample.kwargs()), reference(**ref.kwargs())
    assert out.shape == expected.shape
    grads = torch.autograd.grad(out.sum(), list(sample.grad_inputs().values()))
    expected_grads = torch.autograd.grad(expected.sum(), list(ref.grad_inputs().values()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    for name in BN_BUFFERS:
        if getattr(sample, name) is not None:
            torch.testing.assert_close(getattr(sample, name), getattr(ref, name))


def test_empty_batch_statistics_are_defined():
    z, mean, var = torch.ops.vggbench._conv_stats(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), None, 1, 1)
    assert z.shape == (0, 4, 5, 5) and torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.zeros(4))


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("contiguous", "channels_last"),
                                     ("channels_last", "contiguous")], ids=lambda p: "input-{}-weight-{}".format(*p))
def test_autocast_output_dtype_and_layout_match_native(layouts, residual_dtype):
    """Under autocast native's output is float32 when the residual is float32 (BN's bfloat16
    output plus a float32 residual), and channels_last when the input or the weight is."""
    native, fused = twins()
    to_format = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for unit in (native, fused):
        unit.conv.to(memory_format=to_format[layouts[1]])
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=to_format[layouts[0]])
    residual = None if residual_dtype is None else torch.randn(2, 8, 6, 6, dtype=residual_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = native(x, residual), fused(x, residual)
    assert got.dtype == want.dtype
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt), fmt
    # the fused sum is rounded to bfloat16 before the cast: bfloat16's precision either way
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    got.float().sum().backward()


SHARES = (slice(0, 0), slice(0, 4))  # rank 0 has an empty batch, rank 1 all 4 samples


def sync_unit_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return (torch.randn(4, 8, 5, 5, generator=gen, dtype=torch.float64),
            torch.randn(4, 8, 5, 5, generator=gen, dtype=torch.float64),
            torch.randn(4, 8, 5, 5, generator=gen, dtype=torch.float64))


def empty_rank(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: a synchronised fused unit's training step on its share (rank 0: none)."""
    import torch.distributed as dist

    from vggbench.models import convert_sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    _, fused = twins()
    fused = convert_sync_batchnorm(fused.double())
    x, residual, upstream = (t[SHARES[rank]].clone().requires_grad_() for t in sync_unit_inputs())
    (fused(x, residual) * upstream).sum().backward()
    torch.save({"grad_x": x.grad, "grad_residual": residual.grad, "state": fused.state_dict(),
                "grads": {n: p.grad for n, p in fused.named_parameters()}}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sync_bn_rank_with_an_empty_batch_takes_part(tmp_path):
    """With 2 gloo ranks, one of them with no samples: it takes part with count 0 instead of
    raising while the other waits, and the step equals one process on the whole batch."""
    import torch.multiprocessing as mp

    from vggbench import launch

    mp.spawn(empty_rank, args=(launch.free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _, fused = twins()
    fused.double()
    x, residual, upstream = (t.clone().requires_grad_() for t in sync_unit_inputs())
    (fused(x, residual) * upstream).sum().backward()
    assert ranks[0]["grad_x"].shape == (0, 8, 5, 5)
    torch.testing.assert_close(ranks[1]["grad_x"], x.grad)
    torch.testing.assert_close(ranks[1]["grad_residual"], residual.grad)
    for name, param in fused.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], param.grad)
    for r in ranks:
        torch.testing.assert_close(r["state"], fused.state_dict())
