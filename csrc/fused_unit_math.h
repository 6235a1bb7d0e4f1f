// Per-element maths of the fused unit, written once for the C++ and the CUDA kernels
// (so the CPU tests exercise what the GPU runs). T is the compute type (float/double).
#pragma once

#if defined(__CUDACC__)
#define VGGBENCH_HD __host__ __device__ __forceinline__
#else
#define VGGBENCH_HD inline
#endif

namespace vggbench::math {

template <typename T>
VGGBENCH_HD T leaky_relu(T v, T slope) {
  return v > T(0) ? v : v * slope;
}

// dL/dpre from the output: with slope >= 0, y > 0 exactly when pre > 0, so the output
// alone decides the branch (as F.leaky_relu's backward decides it on its input).
template <typename T>
VGGBENCH_HD T act_grad(T y, T dy, T slope) {
  return y > T(0) ? dy : dy * slope;
}

// The pre-activation from the output (slope > 0).
template <typename T>
VGGBENCH_HD T inverse_act(T y, T slope) {
  return y > T(0) ? y : y / slope;
}

// xhat = (pre - beta - residual) / gamma, with scale = 1 / gamma, shift = beta / gamma.
template <typename T>
VGGBENCH_HD T recover_xhat(T pre, T residual, T scale, T shift) {
  return (pre - residual) * scale - shift;
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

}  // namespace vggbench::math
