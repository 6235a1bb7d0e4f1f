"""The conv -> BatchNorm -> (+residual) -> activation unit every VGG layer is built from.

It is one module so that a fused implementation with the same constructor, the same
`forward(x, residual=None)` and the same parameter names (`conv.*`, `bn.*`) can
replace it without touching model code, and checkpoints stay interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["leaky_relu", "sigmoid"]
NormPosition = Literal["before", "after"]
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "sigmoid")
NORM_POSITIONS: tuple[str, ...] = ("before", "after")


# What a model builds its layers with: called like ConvNormAct(in_channels, out_channels,
# kernel_size=, stride=, bias=, norm=, activation=, negative_slope=), returning a module
# with forward(x, residual=None). ConvNormAct is the native implementation.
UnitFactory = Callable[..., nn.Module]


class ConvNormAct(nn.Module):
    """conv -> [BN] -> (+ residual) -> activation, in native PyTorch layers.

    Args:
        in_channels, out_channels: conv channels.
        kernel_size: square kernel; padding is kernel_size // 2 ("same" for odd sizes).
        stride: conv stride.
        bias: whether the conv has a bias.
        norm: "before" puts BatchNorm2d between conv and activation (the study's BN
            variants), "after" puts it after the activation (an extension the studies
            tried), None leaves it out.
        activation: "leaky_relu" (the study's), "sigmoid", or None (identity: used
            for projection shortcuts).
        negative_slope: LeakyReLU slope (0.01 in the study; 0 gives ReLU).

    `forward(x, residual)` adds `residual` after the conv/BN and before the activation,
    as the study's residual blocks do: out = act(bn(conv(x)) + residual).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = False,
        norm: NormPosition | None = "before",
        activation: Activation | None = "leaky_relu",
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if norm not in (None, *NORM_POSITIONS):
            raise ValueError(f"norm must be one of {NORM_POSITIONS} or None, got {norm!r}")
        if activation not in (None, *ACTIVATIONS):
            raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.norm = norm
        self.activation = activation
        self.negative_slope = negative_slope

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.negative_slope)
        if self.activation == "sigmoid":
            return torch.sigmoid(x)
        return x

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x)
        if self.norm == "before":
            out = self.bn(out)
        if residual is not None:
            out = out + residual
        out = self._act(out)
        if self.norm == "after":
            out = self.bn(out)
        return out

    def extra_repr(self) -> str:
        return f"norm={self.norm}, activation={self.activation}, negative_slope={self.negative_slope}"
