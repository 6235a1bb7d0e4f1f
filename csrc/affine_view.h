// ChannelAffine (fused_unit.h) as the CPU and CUDA normalise passes read it: raw pointers,
// absent operands null (gamma 1, beta 0, bias 0), and each channel's (scale, shift) from
// math::channel_affine. Built on the host, passed by value to CUDA kernels.
#pragma once

#include "fused_unit.h"
#include "fused_unit_math.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace vggbench {

template <typename scalar_t>
struct AffineOperands {
  using acc_t = at::opmath_type<scalar_t>;
  bool normalize;
  const acc_t *gamma, *beta, *mean, *var;
  const scalar_t* bias;  // the conv's, in the activation dtype
  acc_t eps;

  struct Coefficients {
    acc_t scale, shift;
  };

  explicit AffineOperands(const ChannelAffine& a)
      : normalize(a.normalize),
        gamma(data_or_null<acc_t>(a.gamma)),
        beta(data_or_null<acc_t>(a.beta)),
        mean(data_or_null<acc_t>(a.mean)),
        var(data_or_null<acc_t>(a.var)),
        bias(data_or_null<scalar_t>(a.bias)),
        eps(static_cast<acc_t>(a.eps)) {
    TORCH_INTERNAL_ASSERT(!normalize || (mean && var), "normalize_act: BN without statistics");
  }

  VGGBENCH_HD Coefficients of(int64_t c) const {
    Coefficients k;
    math::channel_affine(normalize, gamma ? gamma[c] : acc_t(1), beta ? beta[c] : acc_t(0),
                         normalize ? mean[c] : acc_t(0), normalize ? var[c] : acc_t(0),
                         bias ? static_cast<acc_t>(bias[c]) : acc_t(0), eps, k.scale, k.shift);
    return k;
  }
};

}  // namespace vggbench
