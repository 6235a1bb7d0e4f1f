"""scripts/bf16_winograd_error.py, behind the README's reason for not using the AVX512-BF16
dot products: its emulation is a correct F(4x4, 3x3) conv, and rounding the transformed
operands to bfloat16 makes the output error several times native bfloat16's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bf16_winograd_error.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bf16_winograd_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_norm(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).norm() / reference.norm()).item()


def test_emulated_winograd_is_the_conv_and_bf16_operands_lose_accuracy():
    script = load_script()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 16, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, 3, 3, generator=gen, dtype=torch.float64) / 12
    reference = F.conv2d(x, w, padding=1)
    assert relative_norm(script.winograd(x, w, bf16_operands=False), reference) < 1e-13
    x, w = x.bfloat16().double(), w.bfloat16().double()
    reference = F.conv2d(x, w, padding=1)
    native = relative_norm(F.conv2d(x.bfloat16(), w.bfloat16(), padding=1), reference)
    rounded = relative_norm(script.winograd(x, w, bf16_operands=True).bfloat16(), reference)
    assert rounded > 4 * native, (rounded, native)
