"""Why the CPU Winograd kernels do not use the AVX512-BF16 dot products (README, "The fused op").

vdpbf16ps multiplies pairs of bfloat16 values: in a Winograd conv its operands would be the
transformed input B^T d B and weight G g G^T rounded to bfloat16. This script emulates that
(float64 einsums of F(4x4, 3x3) with the kernels' points 0, 1, -1, 1/2, -2, csrc/cpu/
winograd_simd.h) and prints the output's relative-norm and max errors against a float64 conv of
the same bfloat16 data, beside native bfloat16's and the kernels' own float32 arithmetic:

    .venv/bin/python scripts/bf16_winograd_error.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# B^T and A^T as in csrc/cpu/winograd_simd.h
BT = torch.tensor([[1, -1.5, -2, 1.5, 1, 0], [0, -1, .5, 2.5, 1, 0], [0, 1, -2.5, .5, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, .5, -1, -.5, 1, 0], [0, 1, -1.5, -2, 1.5, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, .5, -2, 0], [0, 1, 1, .25, 4, 0], [0, 1, -1, .125, -8, 1]],
                  dtype=torch.float64)


def weight_transform() -> torch.Tensor:
    """G (6x3), solved from AT (G g * BT d) = the 1-D correlation of g and d for every basis pair."""
    rows, rhs = [], []
    for k in range(3):
        for j in range(6):
            product = AT @ torch.diag(BT[:, j])
            for i in range(4):
                row = torch.zeros(3, 6, dtype=torch.float64)
                row[k] = product[i]
                rows.append(row.flatten())
                rhs.append(float(j - k == i))
    solution = torch.linalg.lstsq(torch.stack(rows), torch.tensor(rhs, dtype=torch.float64)[:, None]).solution
    return solution.reshape(3, 6).T


def winograd(x: torch.Tensor, w: torch.Tensor, bf16_operands: bool) -> torch.Tensor:
    """conv2d(x, w, padding=1) by F(4x4, 3x3) in float64; the transformed operands optionally
    rounded to bfloat16 (exact products, as vdpbf16ps's)."""
    n, _, h, width = x.shape
    g = weight_transform()
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # N, C, H/4, W/4, 6, 6
    v = torch.einsum("ij,nctwjk,lk->nctwil", BT, tiles, BT)
    u = torch.einsum("ij,kcjl,ml->kcim", g, w, g)
    if bf16_operands:
        v, u = v.bfloat16().double(), u.bfloat16().double()
    m = torch.einsum("nctwij,kcij->nktwij", v, u)
    y = torch.einsum("ai,nktwij,bj->nktwab", AT, m, AT)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(n, w.shape[0], h, width)


def errors(y: torch.Tensor, reference: torch.Tensor) -> str:
    d = y.double() - reference
    return f"norm {(d.norm() / reference.norm()).item():.2e}, max {(d.abs().max() / reference.abs().max()).item():.2e}"


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for channels in (32, 3):
        x = torch.randn(8, channels, 32, 32, generator=gen).bfloat16().double()
        w = (torch.randn(32, channels, 3, 3, generator=gen) / (3 * channels ** 0.5)).bfloat16().double()
        reference = F.conv2d(x, w, padding=1)
        print(f"{channels}->32, N=8, 32x32, bfloat16 data; error of the bfloat16 output against float64:")
        native = F.conv2d(x.bfloat16(), w.bfloat16(), padding=1)
        print("  native bfloat16 conv:                ", errors(native, reference))
        print("  Winograd, float32-exact operands:    ", errors(winograd(x, w, False).bfloat16(), reference))
        print("  Winograd, bfloat16-rounded operands: ", errors(winograd(x, w, True).bfloat16(), reference))


if __name__ == "__main__":
    main()
