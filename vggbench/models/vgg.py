"""The VGG family of the study: one spec, one layer-building function, small factories.

Architecture (see README, "How it maps to the study"):
  entry:     conv(3->F, no bias) -> BN -> act                  (BN in every variant)
  stage x S: `blocks_per_stage` processing blocks, then one reduction block
  processing block: C units, convs without bias; with RC the block input is added
                    before the last activation: act(bn(conv(...)) + x)
  reduction block:  unit -> avg_pool2d(2) -> C-1 units, convs WITH bias; with
                    `residual_reduction` a 1x1 stride-2 projection (+BN) shortcut
  head: global average pool -> Linear(F, num_classes)
VGG08 = 3 stages x 0 processing blocks; VGG38 = 3 stages x 5 processing blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vggbench.models.units import ACTIVATIONS, NORM_POSITIONS, ConvNormAct, UnitFactory

VARIANTS: dict[str, dict[str, bool]] = {
    "plain": {"batch_norm": False, "residual": False},
    "bn": {"batch_norm": True, "residual": False},
    "rc": {"batch_norm": False, "residual": True},
    "bn_rc": {"batch_norm": True, "residual": True},
}
VARIANT_LABELS = {"plain": "", "bn": " BN", "rc": " RC", "bn_rc": " BN+RC"}


@dataclass(frozen=True)
class VGGSpec:
    """Everything that defines a model of the family (see the module docstring)."""

    stages: int = 3
    blocks_per_stage: int = 5
    convs_per_block: int = 2
    filters: int = 32
    batch_norm: bool = False
    residual: bool = False
    residual_reduction: bool = False
    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    bn_position: str = "before"
    num_classes: int = 100
    in_channels: int = 3

    def __post_init__(self) -> None:
        positive = ("stages", "convs_per_block", "filters", "num_classes", "in_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be >= 0, got {self.blocks_per_stage}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.bn_position not in NORM_POSITIONS:
            raise ValueError(f"bn_position must be one of {NORM_POSITIONS}, got {self.bn_position!r}")
        if self.negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {self.negative_slope}")

    @property
    def depth(self) -> int:
        """Number of weight layers: convs + the final linear layer (8 for VGG08, 38 for VGG38)."""
        return depth_of(self.stages, self.blocks_per_stage, self.convs_per_block)


def depth_of(stages: int, blocks_per_stage: int, convs_per_block: int) -> int:
    """Weight layers of a VGG: the entry conv, every block's convs, the linear head."""
    return 2 + stages * convs_per_block * (blocks_per_stage + 1)


class ProcessingBlock(nn.Module):
    """`convs_per_block` same-size units; with `residual`, an identity shortcut around them."""

    def __init__(self, units: list[nn.Module], residual: bool) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for unit in self.units[:-1]:
            out = unit(out)
        return self.units[-1](out, residual=x if self.residual else None)


class ReductionBlock(nn.Module):
    """unit -> avg_pool2d(2) -> remaining units; optional projection shortcut."""

    def __init__(self, units: list[nn.Module], shortcut: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.units[0](x), 2)
        for unit in self.units[1:-1]:
            out = unit(out)
        residual = self.shortcut(x) if self.shortcut is not None else None
        return self.units[-1](out, residual=residual)


def make_layers(spec: VGGSpec, unit: UnitFactory = ConvNormAct) -> nn.Sequential:
    """Build the convolutional trunk (entry block + stages) of `spec` from `unit`s."""
    f = spec.filters
    norm = spec.bn_position if spec.batch_norm else None

    def make_unit(in_channels: int, *, bias: bool, unit_norm: str | None = norm) -> nn.Module:
        return unit(
            in_channels, f, kernel_size=3, bias=bias, norm=unit_norm,
            activation=spec.activation, negative_slope=spec.negative_slope,
        )

    layers: list[nn.Module] = [make_unit(spec.in_channels, bias=False, unit_norm=spec.bn_position)]
    for _ in range(spec.stages):
        for _ in range(spec.blocks_per_stage):
            units = [make_unit(f, bias=False) for _ in range(spec.convs_per_block)]
            layers.append(ProcessingBlock(units, residual=spec.residual))
        shortcut = None
        if spec.residual_reduction:
            shortcut = unit(f, f, kernel_size=1, stride=2, bias=not spec.batch_norm,
                            norm="before" if spec.batch_norm else None, activation=None)
        units = [make_unit(f, bias=True) for _ in range(spec.convs_per_block)]
        layers.append(ReductionBlock(units, shortcut))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A model of the study's VGG family: trunk, global average pool, linear classifier."""

    def __init__(self, spec: VGGSpec, unit: UnitFactory = ConvNormAct) -> None:
        super().__init__()
        self.spec = spec
        self.features = make_layers(spec, unit)
        self.classifier = nn.Linear(spec.filters, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.spec.in_channels}, H, W), got {tuple(x.shape)}"
            )
        features = self.features(x)
        return self.classifier(features.mean(dim=(2, 3)))


def parse_model_name(name: str) -> int:
    """Depth of a model name "vggNN" ("vgg08" -> 8, "vgg38" -> 38)."""
    match = re.fullmatch(r"vgg0*(\d+)", name.lower())
    if not match:
        raise ValueError(f"model name must look like 'vgg08' or 'vgg38', got {name!r}")
    return int(match.group(1))


def blocks_for_depth(depth: int, stages: int = 3, convs_per_block: int = 2) -> int:
    """Processing blocks per stage giving `depth` weight layers, or a ValueError listing valid depths."""
    per_block = stages * convs_per_block
    blocks, rest = divmod(depth - 2 - per_block, per_block)
    if blocks < 0 or rest:
        valid = [depth_of(stages, b, convs_per_block) for b in range(6)]
        raise ValueError(
            f"no VGG with {stages} stages and {convs_per_block} convs per block has depth {depth}; "
            f"valid depths are {valid[0]} + {per_block}k: {', '.join(map(str, valid))}, ..."
        )
    return blocks


IMPLS: tuple[str, ...] = ("native", "fused")


def unit_for(impl: str) -> UnitFactory:
    """The unit of an implementation: native PyTorch layers or the fused C++/CUDA op."""
    if impl == "native":
        return ConvNormAct
    if impl == "fused":
        from vggbench.models.fused import FusedConvNormAct  # loads the C++ extension

        return FusedConvNormAct
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def build_model(
    name: str = "vgg38", variant: str = "plain", *, impl: str = "native", unit: UnitFactory | None = None,
    **overrides,
) -> VGG:
    """The public factory: `build_model("vgg38", "bn_rc", impl="fused")`.

    `name` is "vgg<depth>" (depth = weight layers); `variant` one of plain/bn/rc/bn_rc;
    `impl` "native" or "fused" (same parameters and state_dict either way); `unit` a
    custom unit factory instead; `overrides` are other VGGSpec fields (filters, stages,
    convs_per_block, residual_reduction, activation, bn_position, negative_slope,
    num_classes, ...).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    unknown = set(overrides) - set(VGGSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model options: {sorted(unknown)}")
    if "blocks_per_stage" in overrides:
        raise ValueError("blocks_per_stage follows from the depth in the model name (vgg08: 0, vgg38: 5)")
    stages = overrides.get("stages", VGGSpec.stages)
    convs = overrides.get("convs_per_block", VGGSpec.convs_per_block)
    blocks = blocks_for_depth(parse_model_name(name), stages, convs)
    spec = VGGSpec(blocks_per_stage=blocks, **{**VARIANTS[variant], **overrides})
    return VGG(spec, unit or unit_for(impl))


def model_label(name: str, variant: str) -> str:
    """The study's name for a configuration: "VGG38 BN+RC"."""
    return f"VGG{parse_model_name(name):02d}{VARIANT_LABELS[variant]}"


def vgg08(variant: str = "plain", **overrides) -> VGG:
    """VGG08: 7 convs + 1 linear (3 stages of one reduction block each)."""
    return build_model("vgg08", variant, **overrides)


def vgg38(variant: str = "plain", **overrides) -> VGG:
    """VGG38: 37 convs + 1 linear (3 stages of 5 processing blocks + 1 reduction block)."""
    return build_model("vgg38", variant, **overrides)


def vgg38_bn(**overrides) -> VGG:
    """VGG38 with BatchNorm after every conv."""
    return vgg38("bn", **overrides)


def vgg38_rc(**overrides) -> VGG:
    """VGG38 with identity shortcuts around the processing blocks."""
    return vgg38("rc", **overrides)


def vgg38_bn_rc(**overrides) -> VGG:
    """VGG38 with BatchNorm and residual connections."""
    return vgg38("bn_rc", **overrides)


__all__ = [
    "VARIANTS",
    "VGG",
    "ProcessingBlock",
    "ReductionBlock",
    "VGGSpec",
    "build_model",
    "make_layers",
    "model_label",
    "vgg08",
    "vgg38",
    "vgg38_bn",
    "vgg38_bn_rc",
    "vgg38_rc",
]
