"""How close the fused op must come to native PyTorch in float64, per dtype.

One table for the op-level tests (tests/test_ops.py) and the benchmark suite's quick-mode
checks (benchmarks/test_layers.py), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """rtol, and atol relative to the compared tensor's largest magnitude (its scale); `grad`:
    bound on ||actual - expected|| / ||expected|| for gradients (None: elementwise rtol/atol);
    `kink`: grad_output is zeroed where |pre-activation| < kink * scale, where the two may
    legitimately take different branches of the activation."""

    rtol: float
    atol: float
    grad: float | None
    kink: float


# Every comparison is against the native chain in float64 run on the very same (rounded)
# values, so it measures the op's error alone: native float32 itself is off by up to 1e-3
# relative in gradients at N=100 (its BN backward loses digits when |mean| >> std), so
# comparing two float32 results would test native's rounding, not the op.
TOLERANCES = {
    # the only difference is the summation order: ~1e-15 relative observed
    torch.float64: Tolerance(rtol=1e-10, atol=1e-10, grad=None, kink=1e-10),
    # BN divides by a std computed from up to 1e5 values and gradients are sums over
    # M = N*H*W terms: ~5e-7 relative observed in outputs and ~4e-6 (of the largest
    # entry) in weight gradients at N=100
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5, grad=None, kink=1e-4),
    # unit roundoff u = 2^-8: the conv output is rounded before BN (as in native) and the
    # output once more, so outputs are within ~1u of their scale (plus 1u relative); 2u is
    # allowed. Gradients pass through a rounded dz and a bf16 conv backward: ~1.3e-2
    # relative-norm error observed (native bf16 does no better), 2^-5 (8u) allowed. A
    # pre-activation is only known to ~4u of the output scale, hence the kink margin.
    torch.bfloat16: Tolerance(rtol=2**-7, atol=2**-7, grad=2**-5, kink=2**-6),
    # the same multiples of u = 2^-11
    torch.float16: Tolerance(rtol=2**-10, atol=2**-10, grad=2**-8, kink=2**-9),
}
