// The per-element view of BackwardInputs the CPU and CUDA backward passes share: g, xhat
// and the recovery rule's terms at offset i, or from values already loaded (the CPU's
// vectors); fused_unit_math.h does the maths. Built on the host, passed by value to CUDA
// kernels.
#pragma once

#include "fused_unit.h"
#include "fused_unit_math.h"

#include <ATen/OpMathType.h>

#include <limits>
#include <type_traits>

namespace vggbench {

// The type xhat is recovered in: double for float activations (so that recovery adds only
// the output's own rounding: see the rule in fused_unit_math.h), else the compute type.
template <typename scalar_t>
using recovery_t =
    std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

// One channel of training-mode BN, or (the CPU passes) a vector of channels' lanes: the
// recovery coefficients (math::recovery_coefficients) in the recovery type R, the rule's
// operands and the input gradient's in the compute type A.
template <typename A, typename R>
struct BackwardChannel {
  R recover_scale, recover_shift;
  A gamma, beta, invstd, centre;  // centre = mean * invstd
};

template <typename scalar_t>
struct BackwardView {
  using acc_t = at::opmath_type<scalar_t>;
  using rec_t = recovery_t<scalar_t>;
  using Channel = BackwardChannel<acc_t, rec_t>;

  // Whether the negative branch's pre = y / slope is a division (double activations: the
  // rule's margin in float64 is thin) or a product with a rounded 1 / slope (float and
  // bfloat16: one more rounding of a type 2^16 or 2^29 times finer, far cheaper than a
  // division per element).
  static constexpr bool kDivide = std::is_same_v<rec_t, scalar_t>;

  const scalar_t *dy, *y, *res, *xhat;
  const acc_t *gamma, *beta, *mean, *var;  // null without training-mode BN
  acc_t eps, slope;
  rec_t inv_slope;
  // The rule's roundoff ratios to the activation dtype's: of the recovery arithmetic, of
  // the cast of its result to the compute type (0 when there is none), and of the inverse
  // activation (fused_unit_math.h's d rho_r).
  acc_t rho_recover = roundoff_ratio<rec_t>();
  acc_t rho_cast = std::is_same_v<rec_t, acc_t> ? acc_t(0) : roundoff_ratio<acc_t>();
  acc_t rho_inverse = (kDivide ? acc_t(1) : acc_t(2)) * rho_recover;

  explicit BackwardView(const BackwardInputs& in)
      : dy(in.grad_out.const_data_ptr<scalar_t>()),
        y(in.out.const_data_ptr<scalar_t>()),
        res(data_or_null<scalar_t>(in.residual)),
        xhat(data_or_null<scalar_t>(in.xhat)),
        gamma(channel_data(in.gamma)),
        beta(channel_data(in.beta)),
        mean(channel_data(in.mean)),
        var(channel_data(in.var)),
        eps(static_cast<acc_t>(in.eps)),
        slope(static_cast<acc_t>(in.slope)),
        inv_slope(rec_t(1) / static_cast<rec_t>(in.slope)) {}

  static const acc_t* channel_data(const Tensor& t) {
    return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
  }
  template <typename T>
  static acc_t roundoff_ratio() {
    return static_cast<acc_t>(static_cast<double>(std::numeric_limits<T>::epsilon()) /
                              static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
  }

  VGGBENCH_HD Channel channel(int64_t c) const {
    Channel ch;
    ch.gamma = gamma[c], ch.beta = beta[c], ch.invstd = math::inv_std(var[c], eps);
    ch.centre = mean[c] * ch.invstd;
    math::recovery_coefficients(static_cast<rec_t>(ch.gamma), static_cast<rec_t>(ch.beta),
                                ch.recover_scale, ch.recover_shift);
    return ch;
  }

  // The per-element maths from values: A is acc_t, or (the CPU passes) a vector of its
  // lanes with R the matching vector of rec_t; y, dy and the residual widened to A.
  // g = dL/dpre.
  template <typename A>
  VGGBENCH_HD A g_of(A y_value, A dy_value) const {
    return math::act_grad(y_value, dy_value, A(slope));
  }
  // xhat recovered from the output (residual 0 without one).
  template <typename A, typename R>
  VGGBENCH_HD A recovered_xhat_of(A y_value, A residual, const BackwardChannel<A, R>& ch) const {
    const R v = static_cast<R>(y_value);
    const R pre = kDivide ? math::inverse_act(v, R(static_cast<rec_t>(slope)))
                          : math::inverse_act_by_product(v, R(inv_slope));
    return static_cast<A>(math::recover_xhat(pre, static_cast<R>(residual), ch.recover_scale, ch.recover_shift));
  }
  // The recovery rule's per-element terms (fused_unit_math.h) with xhat recovered; the
  // pre-activation in them is an estimate, computed in A (its rounding does not matter).
  template <typename A, typename R>
  VGGBENCH_HD void recovery_terms_of(A y_value, A dy_value, A residual, const BackwardChannel<A, R>& ch,
                                     A (&terms)[math::kRecoveryTerms]) const {
    const A pre = math::inverse_act_by_product(y_value, A(static_cast<acc_t>(inv_slope)));
    math::recovery_terms(g_of(y_value, dy_value), recovered_xhat_of(y_value, residual, ch), pre, residual,
                         ch.beta, ch.centre, A(rho_recover), A(rho_cast), A(rho_inverse), terms);
  }

  // The same at offset i. HasResidual: whether `res` is set (a compile-time flag keeps the
  // inner loops branch-free).
  VGGBENCH_HD acc_t g(int64_t i) const {
    return g_of(static_cast<acc_t>(y[i]), static_cast<acc_t>(dy[i]));
  }
  template <bool HasResidual>
  VGGBENCH_HD acc_t residual_at(int64_t i) const {
    return HasResidual ? static_cast<acc_t>(res[i]) : acc_t(0);
  }
  template <bool HasResidual>
  VGGBENCH_HD acc_t recovered_xhat(int64_t i, const Channel& ch) const {
    return recovered_xhat_of(static_cast<acc_t>(y[i]), residual_at<HasResidual>(i), ch);
  }
  // xhat, given or recovered.
  VGGBENCH_HD acc_t x_hat(int64_t i, const Channel& ch) const {
    if (xhat) return static_cast<acc_t>(xhat[i]);
    return res ? recovered_xhat<true>(i, ch) : recovered_xhat<false>(i, ch);
  }
  template <bool HasResidual>
  VGGBENCH_HD void recovery_terms(int64_t i, const Channel& ch,
                                  acc_t (&terms)[math::kRecoveryTerms]) const {
    recovery_terms_of(static_cast<acc_t>(y[i]), static_cast<acc_t>(dy[i]), residual_at<HasResidual>(i), ch,
                      terms);
  }
  // A channel's verdict from its summed terms: 1 to recompute xhat, 0 to recover it.
  VGGBENCH_HD acc_t recompute_flag(const acc_t (&sums)[math::kRecoveryTerms], acc_t count,
                                   const Channel& ch) const {
    return math::recovery_accurate(sums, count, ch.gamma, ch.beta, rho_recover)
               ? acc_t(0)
               : acc_t(1);
  }
};

}  // namespace vggbench
