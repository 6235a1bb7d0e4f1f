// Per-element and per-channel maths of the fused unit, written once for the C++ and the
// CUDA kernels (so the CPU tests exercise what the GPU runs). T is the compute type
// (float/double).
#pragma once

#include "host_device.h"

#include <math.h>

namespace vggbench::math {

// c ? a : b. The formulas below choose through it, unqualified, so that they also take the
// CPU passes' vectors of lanes (cpu/lanes.h overloads it for a mask of lanes).
template <typename T>
VGGBENCH_HD T select(bool c, T a, T b) {
  return c ? a : b;
}

template <typename T>
VGGBENCH_HD T leaky_relu(T v, T slope) {
  return select(v > T(0), v, v * slope);
}

// dL/dpre from the output: with slope >= 0, y > 0 exactly when pre > 0, so the output
// alone decides the branch (as F.leaky_relu's backward decides it on its input).
template <typename T>
VGGBENCH_HD T act_grad(T y, T dy, T slope) {
  return select(y > T(0), dy, dy * slope);
}

// The pre-activation from the output (slope > 0).
template <typename T>
VGGBENCH_HD T inverse_act(T y, T slope) {
  return select(y > T(0), y, y / slope);
}

// The same with inv_slope = 1 / slope (rounded): a product instead of a division.
template <typename T>
VGGBENCH_HD T inverse_act_by_product(T y, T inv_slope) {
  return select(y > T(0), y, y * inv_slope);
}

// xhat = (pre - beta - residual) / gamma, with scale = 1 / gamma, shift = beta / gamma.
template <typename T>
VGGBENCH_HD T recover_xhat(T pre, T residual, T scale, T shift) {
  return (pre - residual) * scale - shift;
}

// The per-channel coefficients of recover_xhat: scale = 1 / gamma, shift = beta / gamma.
template <typename T>
VGGBENCH_HD void recovery_coefficients(T gamma, T beta, T& scale, T& shift) {
  scale = T(1) / gamma, shift = beta * scale;
}

// BatchNorm's input gradient: k = gamma * invstd, mean_g = sum(g) / M,
// mean_gx = sum(g * xhat) / M.
template <typename T>
VGGBENCH_HD T bn_input_grad(T g, T xhat, T k, T mean_g, T mean_gx) {
  return k * (g - mean_g - xhat * mean_gx);
}

// Mean and biased variance from sums of (z - shift) and (z - shift)^2 over `count`
// values; the shift (one sample of the channel) avoids cancellation when |mean| >> std.
template <typename T>
VGGBENCH_HD void mean_var(T sum, T sumsq, T shift, T count, T& mean, T& var) {
  const T m = sum / count;
  mean = shift + m;
  const T v = sumsq / count - m * m;
  var = v < T(0) ? T(0) : v;  // clamps rounding below 0; keeps NaN (as native)
}

VGGBENCH_HD float square_root(float v) { return ::sqrtf(v); }
VGGBENCH_HD double square_root(double v) { return ::sqrt(v); }

// 1 / sqrt(var + eps): BatchNorm's inverse standard deviation.
template <typename T>
VGGBENCH_HD T inv_std(T var, T eps) {
  return T(1) / square_root(var + eps);
}

// A channel's normalisation z -> z * scale + shift (fused_unit.h's ChannelAffine): with
// `normalize`, scale = gamma / sqrt(var + eps), shift = beta + (bias - mean) * scale (the
// conv bias enters here, so the conv runs without it); otherwise scale 1, shift = bias.
template <typename T>
VGGBENCH_HD void channel_affine(bool normalize, T gamma, T beta, T mean, T var, T bias, T eps,
                                T& scale, T& shift) {
  scale = normalize ? gamma * inv_std(var, eps) : T(1);
  shift = normalize ? beta + (bias - mean) * scale : bias;
}

// The backward's per-channel coefficients from the sums over `count` values (an empty batch
// has sums 0: dividing by at least 1 keeps 0 / 0 out).
template <typename T>
VGGBENCH_HD void bn_backward_coefficients(T gamma, T invstd, T sum_g, T sum_gx, T count, T& k,
                                          T& mean_g, T& mean_gx) {
  const T n = count > T(0) ? count : T(1);
  k = gamma * invstd, mean_g = sum_g / n, mean_gx = sum_gx / n;
}

// nn.BatchNorm2d's running-statistics update of one channel from the batch's mean and
// biased variance over `count` values (none: nothing changes), with the factor
// momentum or 1 / num_batches_tracked; the variance enters unbiased.
template <typename T>
VGGBENCH_HD void running_update(T batch_mean, T batch_var, T count, T factor, T& running_mean,
                                T& running_var) {
  if (!(count > T(0))) return;
  running_mean = batch_mean * factor + running_mean * (T(1) - factor);
  running_var = batch_var * (count / (count - T(1))) * factor + running_var * (T(1) - factor);
}

// ---- Recover or recompute: the rule and its error bound --------------------------------
// Backward needs xhat = (z - mean) r, r = 1 / sqrt(var + eps), per element. Errors below are
// first order, per element, in units of u (the activation dtype's unit roundoff) and of
// xhat; rho = u_c / u with u_c the compute type's (1 for float and double, 2^-16 for
// bfloat16: its products and sums run in float).
// Native BN reads xhat from its stored conv output z (rounded: u |z|), then subtracts the
// mean and scales (u_c each), so its xhat carries
//   n = |xhat + mean r| + 2 rho |xhat|.
// Recovered from the output, xhat' = (pre' - residual) / gamma - beta / gamma, where pre'
// comes from y (rounded: u |pre|). The recovery arithmetic runs in a type of roundoff
// rho_r u (double for float activations, backward_view.h): the negative branch's y / slope
// (d rho_r |pre|: d = 1 for a division, 2 for a product with a rounded 1 / slope, which the
// code uses where rho_r is small, i.e. for float and bfloat16 activations), the
// subtraction, the product with 1 / gamma, its rounding and the shift add
// rho_r (3 |pre - residual| + |beta|); casting the result to the compute type (float
// activations: double -> float) adds rho_c |gamma xhat| = rho_c |pre - residual - beta| (to
// first order: xhat' is exact to rho_r). All divided by |gamma|:
//   e = (p + rho_r |beta|) / |gamma|,
//   p = |pre| (1 + d rho_r) + 3 rho_r |pre - residual| + rho_c |pre - residual - beta|.
// (Both share the conv's own rounding and the forward's, which the recovery cannot worsen.)
// With g = dL/dpre, M values per channel:
//   dgamma = sum(g xhat): recovery adds at most sum(|g| e); native's error is at most
//       sum(|g| n). Needing sum(|g| p) + rho_r |beta| sum(|g|) <= K |gamma| sum(|g| n)
//       keeps the added error within K times native's (bound against bound; both are sums of
//       independent roundings over the same g, so their typical sizes scale alike).
//   dz = gamma r (g - sum(g)/M - xhat sum(g xhat)/M) (and dx, dW from it): recovery adds
//       gamma r [(xhat' - xhat) sum(g xhat)/M + xhat sum(g (xhat' - xhat))/M]. The second
//       term is gamma r xhat times the dgamma error / M: covered above, against the same
//       term of native's. The first, r (p + rho_r |beta|) |sum(g xhat)| / M per element, has
//       a root mean square over the channel of at most r (rms(p) + rho_r |beta|)
//       |sum(g xhat)| / M. Native's dz carries u |gamma| r (|g| + n |sum(g xhat)| / M)
//       (its rounding, and its xhat's error through the same product), of root mean square
//       at least |gamma| r max(rms(g), rms(n) |sum(g xhat)| / M): needing
//       (rms(p) + rho_r |beta|) |sum(g xhat)| / M <= K |gamma| max(rms(g), rms(n) |sum(g xhat)| / M)
//       keeps it within K times.
//   dbeta = sum(g) and the residual's gradient g do not involve xhat: exact either way.
// Channels failing either condition (or with NaN or Inf in the sums: gamma = 0 gives
// 1 / gamma = Inf) recompute xhat with the conv instead: native's numerics. An ideal float32
// channel (no residual, beta 0) has p = 2 |gamma xhat| against n = 3 |xhat|; in float64
// (rho_r = 1, rho_c = 0) p = 5 |gamma xhat|, so K must exceed 5/3 there. K = 2 keeps the
// total (native's share plus the added one) within the tests' 4x of native's error
// (tests/test_op_recovery.py), with room for the randomness of rounding.
constexpr double kRecoveryFactor = 2.0;

// The per-element terms the rule sums: 0 g, 1 g xhat', 2 |g|, 3 |g| n, 4 |g| p, 5 g^2, 6 p^2,
// 7 n^2 (terms 0 and 1 are the backward's own sums).
constexpr int kRecoveryTerms = 8;

template <typename T>
VGGBENCH_HD T abs_of(T v) {
  return select(v < T(0), -v, v);
}

// rho_r, rho_c: the roundoff ratios of the recovery arithmetic and of its cast (above); the
// compute type's, for native's n, is 1 with float arithmetic and rho_r + rho_c in general;
// rho_inverse = d rho_r, the inverse activation's.
template <typename T>
VGGBENCH_HD void recovery_terms(T g, T xhat, T pre, T residual, T beta, T centre, T rho_r, T rho_c,
                                T rho_inverse, T (&terms)[kRecoveryTerms]) {
  const T abs_g = abs_of(g);
  const T n = abs_of(xhat + centre) + T(2) * (rho_r + rho_c) * abs_of(xhat);
  const T p = abs_of(pre) * (T(1) + rho_inverse) + T(3) * rho_r * abs_of(pre - residual) +
              rho_c * abs_of(pre - residual - beta);
  terms[0] = g, terms[1] = g * xhat, terms[2] = abs_g, terms[3] = abs_g * n;
  terms[4] = abs_g * p, terms[5] = g * g, terms[6] = p * p, terms[7] = n * n;
}

// Whether recovered xhat keeps every gradient within kRecoveryFactor of native's error
// (the derivation above), from a channel's summed terms over `count` values; rho = rho_r.
template <typename T>
VGGBENCH_HD bool recovery_accurate(const T (&sums)[kRecoveryTerms], T count, T gamma, T beta,
                                   T rho) {
  if (count == T(0)) return true;  // nothing to recover
  const T k = static_cast<T>(kRecoveryFactor) * abs_of(gamma);
  const T rho_beta = rho * abs_of(beta);
  const bool dgamma_ok = sums[4] + rho_beta * sums[2] <= k * sums[3];
  const auto rms = [count](T sum_of_squares) {
    return static_cast<T>(::sqrt(static_cast<double>(sum_of_squares / count)));
  };
  const T mean_gx = abs_of(sums[1]) / count, native_dz = rms(sums[7]) * mean_gx;
  const bool dz_ok = (rms(sums[6]) + rho_beta) * mean_gx <= k * (rms(sums[5]) < native_dz ? native_dz : rms(sums[5]));
  const bool finite = abs_of(gamma) * T(0) == T(0);  // false for Inf and NaN
  return finite && dgamma_ok && dz_ok;  // a NaN anywhere makes a comparison false
}

}  // namespace vggbench::math
