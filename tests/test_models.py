"""The VGG family: parameter counts of the study, shapes, forward/backward, swappable units."""

import pytest
import torch
from torch import nn

from vggbench.models import (
    ConvNormAct,
    VGGSpec,
    build_model,
    model_label,
    vgg08,
    vgg38,
    vgg38_bn,
    vgg38_bn_rc,
    vgg38_rc,
)
from vggbench.models.vgg import ProcessingBlock, ReductionBlock


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "factory, expected",
    [(vgg08, 59_716), (vgg38, 336_196), (vgg38_bn, 338_500), (vgg38_rc, 336_196), (vgg38_bn_rc, 338_500)],
)
def test_parameter_counts_match_the_study(factory, expected):
    assert n_params(factory()) == expected


def test_extension_parameter_counts_follow_the_architecture():
    # A 1x1 projection per reduction block: 32*32 weights + (BN: 64 | bias: 32).
    assert n_params(vgg38_bn_rc(residual_reduction=True)) == 338_500 + 3 * (32 * 32 + 64)
    assert n_params(vgg38_rc(residual_reduction=True)) == 336_196 + 3 * (32 * 32 + 32)
    assert n_params(vgg38(activation="sigmoid")) == 336_196
    assert n_params(vgg38_bn(bn_position="after")) == 338_500


@pytest.mark.parametrize("name, variant", [(m, v) for m in ("vgg08", "vgg38") for v in ("plain", "bn", "rc", "bn_rc")])
def test_forward_backward_shapes(name, variant):
    model = build_model(name, variant, residual_reduction=variant.endswith("rc"))
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 100)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_depth_counts_weight_layers():
    model = vgg38()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 37 and len(linears) == 1 and model.spec.depth == 38
    assert len([m for m in vgg08().modules() if isinstance(m, nn.Conv2d)]) == 7
    assert build_model("vgg14").spec.blocks_per_stage == 1


def test_entry_block_has_batchnorm_in_plain_variants_and_biases_only_in_reductions():
    model = vgg38()
    entry = model.features[0]
    assert isinstance(entry.bn, nn.BatchNorm2d) and entry.conv.bias is None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1
    for block in model.features[1:]:
        has_bias = isinstance(block, ReductionBlock)
        assert all((u.conv.bias is not None) == has_bias for u in block.units)


def test_residual_is_added_before_the_final_activation():
    torch.manual_seed(0)
    block = ProcessingBlock([ConvNormAct(8, 8, norm=None), ConvNormAct(8, 8, norm=None)], residual=True)
    x = torch.randn(2, 8, 6, 6)
    u1, u2 = block.units
    expected = torch.nn.functional.leaky_relu(u2.conv(u1(x)) + x, 0.01)
    torch.testing.assert_close(block(x), expected)


def test_norm_after_activation_order():
    torch.manual_seed(0)
    unit = ConvNormAct(3, 4, norm="after", activation="sigmoid")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(unit(x), unit.bn(torch.sigmoid(unit.conv(x))))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = vgg08("bn_rc")
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


def test_unit_is_swappable_without_touching_model_code():
    built = []

    def counting_unit(*args, **kwargs):
        built.append(kwargs)
        return ConvNormAct(*args, **kwargs)

    model = build_model("vgg38", "bn_rc", unit=counting_unit)
    assert len(built) == 37 and n_params(model) == 338_500
    # same state_dict layout as the default unit: checkpoints are interchangeable
    assert model.state_dict().keys() == vgg38_bn_rc().state_dict().keys()


def test_plain_vgg38_gradients_vanish_at_initialisation():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    grads = {}
    for name, model in (("vgg08", vgg08()), ("vgg38", vgg38())):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads[name] = model.features[0].conv.weight.grad.abs().mean().item()
    assert grads["vgg38"] < 1e-6 * grads["vgg08"]


def test_labels():
    assert model_label("vgg38", "bn_rc") == "VGG38 BN+RC"
    assert model_label("vgg08", "plain") == "VGG08"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "vgg39"}, r"valid depths are 8 \+ 6k: 8, 14, 20"),
        ({"name": "resnet"}, "model name must look like"),
        ({"variant": "bn+rc"}, "variant must be one of"),
        ({"filters": 0}, "filters must be >= 1"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"bn_position": "middle"}, "bn_position must be one of"),
        ({"colour": 1}, "unknown model options"),
        ({"blocks_per_stage": 2}, "follows from the depth"),
    ],
)
def test_bad_model_options_are_clear(kwargs, message):
    name = kwargs.pop("name", "vgg38")
    variant = kwargs.pop("variant", "plain")
    with pytest.raises(ValueError, match=message):
        build_model(name, variant, **kwargs)


def test_wrong_input_shape_is_clear():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        vgg08()(torch.randn(2, 1, 32, 32))


def test_spec_rejects_negative_blocks():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        VGGSpec(blocks_per_stage=-1)
