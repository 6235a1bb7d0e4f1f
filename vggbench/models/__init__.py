"""The study's VGG family built from swappable conv->BN->act units."""

from vggbench.models.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm
from vggbench.models.units import ConvNormAct, UnitFactory
from vggbench.models.vgg import (
    IMPLS,
    VARIANTS,
    VGG,
    VGGSpec,
    build_model,
    make_layers,
    model_label,
    unit_for,
    vgg08,
    vgg38,
    vgg38_bn,
    vgg38_bn_rc,
    vgg38_rc,
)

__all__ = [
    "IMPLS",
    "VARIANTS",
    "VGG",
    "ConvNormAct",
    "SyncBatchNorm2d",
    "UnitFactory",
    "VGGSpec",
    "build_model",
    "convert_sync_batchnorm",
    "make_layers",
    "model_label",
    "unit_for",
    "vgg08",
    "vgg38",
    "vgg38_bn",
    "vgg38_bn_rc",
    "vgg38_rc",
]
