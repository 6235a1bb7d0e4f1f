// The per-element view of BackwardInputs the CPU and CUDA backward passes share:
// g, the pre-activation and xhat at offset i of channel c (fused_unit_math.h does the
// maths). Built on the host, passed by value to CUDA kernels.
#pragma once

#include "fused_unit.h"
#include "fused_unit_math.h"

#include <ATen/OpMathType.h>

namespace vggbench {

template <typename scalar_t>
struct BackwardView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dy, *y, *res, *xhat;
  const acc_t *rscale, *rshift;
  acc_t slope;

  explicit BackwardView(const BackwardInputs& in)
      : dy(in.grad_out.const_data_ptr<scalar_t>()),
        y(in.out.const_data_ptr<scalar_t>()),
        res(data_or_null<scalar_t>(in.residual)),
        xhat(data_or_null<scalar_t>(in.xhat)),
        rscale(in.recover_scale.defined() ? in.recover_scale.const_data_ptr<acc_t>() : nullptr),
        rshift(in.recover_shift.defined() ? in.recover_shift.const_data_ptr<acc_t>() : nullptr),
        slope(static_cast<acc_t>(in.slope)) {}

  VGGBENCH_HD acc_t g(int64_t i) const {
    return math::act_grad(static_cast<acc_t>(y[i]), static_cast<acc_t>(dy[i]), slope);
  }
  VGGBENCH_HD acc_t pre(int64_t i) const {
    return math::inverse_act(static_cast<acc_t>(y[i]), slope);
  }
  // xhat recovered from the output; HasResidual: whether `res` is set (a compile-time
  // flag keeps the CPU's inner loops branch-free).
  template <bool HasResidual>
  VGGBENCH_HD acc_t recovered_xhat(int64_t i, int64_t c) const {
    const acc_t r = HasResidual ? static_cast<acc_t>(res[i]) : acc_t(0);
    return math::recover_xhat(pre(i), r, rscale[c], rshift[c]);
  }
  VGGBENCH_HD acc_t x_hat(int64_t i, int64_t c) const {
    if (xhat) return static_cast<acc_t>(xhat[i]);
    return res ? recovered_xhat<true>(i, c) : recovered_xhat<false>(i, c);
  }
};

}  // namespace vggbench
