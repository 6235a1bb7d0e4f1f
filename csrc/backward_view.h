// The per-element view of BackwardInputs the CPU and CUDA backward passes share:
// g, the pre-activation and xhat at offset i of channel c (fused_unit_math.h does the
// maths). Built on the host, passed by value to CUDA kernels.
#pragma once

#include "fused_unit.h"
#include "fused_unit_math.h"

#include <ATen/OpMathType.h>

#include <limits>

namespace vggbench {

template <typename scalar_t>
struct BackwardView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dy, *y, *res, *xhat;
  const acc_t *rscale, *rshift, *gamma, *beta, *centre;
  acc_t slope;
  // u_c / u: the compute type's roundoff relative to the activation dtype's (the rule's rho)
  acc_t rho = static_cast<acc_t>(std::numeric_limits<acc_t>::epsilon()) /
              static_cast<acc_t>(std::numeric_limits<scalar_t>::epsilon());

  explicit BackwardView(const BackwardInputs& in)
      : dy(in.grad_out.const_data_ptr<scalar_t>()),
        y(in.out.const_data_ptr<scalar_t>()),
        res(data_or_null<scalar_t>(in.residual)),
        xhat(data_or_null<scalar_t>(in.xhat)),
        rscale(channel_data(in.recover_scale)),
        rshift(channel_data(in.recover_shift)),
        gamma(channel_data(in.gamma)),
        beta(channel_data(in.beta)),
        centre(channel_data(in.centre)),
        slope(static_cast<acc_t>(in.slope)) {}

  static const acc_t* channel_data(const Tensor& t) {
    return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
  }

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
  // The recovery rule's per-element terms (fused_unit_math.h) with xhat recovered.
  template <bool HasResidual>
  VGGBENCH_HD void recovery_terms(int64_t i, int64_t c, acc_t (&terms)[math::kRecoveryTerms]) const {
    const acc_t r = HasResidual ? static_cast<acc_t>(res[i]) : acc_t(0);
    math::recovery_terms(g(i), recovered_xhat<HasResidual>(i, c), pre(i), r, centre[c], rho, terms);
  }
  // Channel c's verdict from its summed terms: 1 to recompute xhat, 0 to recover it.
  VGGBENCH_HD acc_t recompute_flag(const acc_t (&sums)[math::kRecoveryTerms], acc_t count,
                                   int64_t c) const {
    return math::recovery_accurate(sums, count, gamma[c], beta[c], rho) ? acc_t(0) : acc_t(1);
  }
};

}  // namespace vggbench
