// The per-element view of BackwardInputs the CPU and CUDA backward passes share:
// g, the pre-activation and xhat at offset i of channel c (fused_unit_math.h does the
// maths). Built on the host, passed by value to CUDA kernels.
#pragma once

#include "fused_unit.h"
#include "fused_unit_math.h"

#include <ATen/OpMathType.h>

#include <limits>
#include <type_traits>

namespace vggbench {

// The type xhat is recovered in: double for float activations (so that recovery adds only
// the output's own rounding: see the rule in fused_unit_math.h), else the compute type.
// recovery_dtype (fused_unit.h) is its ScalarType, the dtype of recover_scale and _shift.
template <typename scalar_t>
using recovery_t =
    std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

template <typename scalar_t>
struct BackwardView {
  using acc_t = at::opmath_type<scalar_t>;
  using rec_t = recovery_t<scalar_t>;
  const scalar_t *dy, *y, *res, *xhat;
  const rec_t *rscale, *rshift;
  const acc_t *gamma, *beta, *centre;
  acc_t slope;
  // The rule's roundoff ratios to the activation dtype's: of the recovery arithmetic, and of
  // the cast of its result to the compute type (0 when there is none).
  acc_t rho_recover = roundoff_ratio<rec_t>();
  acc_t rho_cast = std::is_same_v<rec_t, acc_t> ? acc_t(0) : roundoff_ratio<acc_t>();

  explicit BackwardView(const BackwardInputs& in)
      : dy(in.grad_out.const_data_ptr<scalar_t>()),
        y(in.out.const_data_ptr<scalar_t>()),
        res(data_or_null<scalar_t>(in.residual)),
        xhat(data_or_null<scalar_t>(in.xhat)),
        rscale(channel_data<rec_t>(in.recover_scale)),
        rshift(channel_data<rec_t>(in.recover_shift)),
        gamma(channel_data<acc_t>(in.gamma)),
        beta(channel_data<acc_t>(in.beta)),
        centre(channel_data<acc_t>(in.centre)),
        slope(static_cast<acc_t>(in.slope)) {}

  template <typename T>
  static const T* channel_data(const Tensor& t) {
    return t.defined() ? t.const_data_ptr<T>() : nullptr;
  }
  template <typename T>
  static acc_t roundoff_ratio() {
    return static_cast<acc_t>(static_cast<double>(std::numeric_limits<T>::epsilon()) /
                              static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
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
    const rec_t r = HasResidual ? static_cast<rec_t>(res[i]) : rec_t(0);
    const rec_t pre = math::inverse_act(static_cast<rec_t>(y[i]), static_cast<rec_t>(slope));
    return static_cast<acc_t>(math::recover_xhat(pre, r, rscale[c], rshift[c]));
  }
  VGGBENCH_HD acc_t x_hat(int64_t i, int64_t c) const {
    if (xhat) return static_cast<acc_t>(xhat[i]);
    return res ? recovered_xhat<true>(i, c) : recovered_xhat<false>(i, c);
  }
  // The recovery rule's per-element terms (fused_unit_math.h) with xhat recovered.
  template <bool HasResidual>
  VGGBENCH_HD void recovery_terms(int64_t i, int64_t c, acc_t (&terms)[math::kRecoveryTerms]) const {
    const acc_t r = HasResidual ? static_cast<acc_t>(res[i]) : acc_t(0);
    math::recovery_terms(g(i), recovered_xhat<HasResidual>(i, c), pre(i), r, centre[c], rho_recover,
                         rho_cast, terms);
  }
  // Channel c's verdict from its summed terms: 1 to recompute xhat, 0 to recover it.
  VGGBENCH_HD acc_t recompute_flag(const acc_t (&sums)[math::kRecoveryTerms], acc_t count,
                                   int64_t c) const {
    return math::recovery_accurate(sums, count, gamma[c], beta[c], rho_recover + rho_cast) ? acc_t(0)
                                                                                        : acc_t(1);
  }
};

}  // namespace vggbench
