// The fused conv -> BatchNorm -> (+residual) -> LeakyReLU unit: what the shared
// orchestration (fused_unit.cpp) needs from a backend (cpu/, cuda/).
//
// A backend provides the conv (ATen's, or its own for the shapes it is fast at) and the
// passes over the activation-sized tensors around it. Every such tensor is contiguous in one memory
// format and seen as (outer, C, inner): NCHW -> (N, C, H*W), NHWC -> (N*H*W, C, 1),
// element (o, c, i) at offset (o * C + c) * inner + i.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace torch {
class Library;
}

namespace vggbench {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

struct Geometry {
  int64_t outer, channels, inner;
  int64_t count() const { return outer * inner; }  // elements per channel
};

// The (outer, C, inner) view of a 4-D tensor contiguous in NCHW or NHWC.
Geometry geometry_of(const Tensor& t);

// The layout every activation-sized tensor of one call is made contiguous in: channels_last
// when the input or the conv weight is (native conv's rule), else contiguous. The same
// rule as vggbench/ops.py's fake implementations.
at::MemoryFormat memory_format_of(const Tensor& input, const Tensor& weight);

// The data of an optional tensor, or nullptr: how kernels see absent operands.
template <typename T>
const T* data_or_null(const OptTensor& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// float for float/half/bfloat16 activations, double for double: the dtype of the
// statistics and per-channel coefficients the kernels take and return.
at::ScalarType stats_dtype(at::ScalarType activation);

// The dtype of the recovery coefficients (BackwardInputs::recover_scale and _shift): double
// for float activations (backward_view.h's recovery_t), else stats_dtype.
at::ScalarType recovery_dtype(at::ScalarType activation);

// The activation-sized inputs of the backward passes. xhat (the normalised conv output)
// is recovered element by element from the output when `xhat` is absent:
//   pre = y > 0 ? y : y / slope,   xhat = (pre - residual) * recover_scale - recover_shift
// with recover_scale = 1 / gamma and recover_shift = beta / gamma per channel; gamma, beta
// and centre = mean / sqrt(var + eps) feed the recovery rule (fused_unit_math.h).
// The per-channel tensors are undefined without training-mode BN.
struct BackwardInputs {
  Tensor grad_out, out;
  OptTensor residual;
  OptTensor xhat;
  Tensor recover_scale, recover_shift, gamma, beta, centre;
  double slope;
};

// ATen's conv and conv backward (grads of input, weight, bias as `mask` asks; undefined
// where not asked): the Kernels default, and the fallback of a backend's own conv.
Tensor aten_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
                 int64_t padding);
std::tuple<Tensor, Tensor, Tensor> aten_conv_backward(const Tensor& grad_z, const Tensor& x,
                                                      const Tensor& weight, bool has_bias,
                                                      int64_t stride, int64_t padding,
                                                      std::array<bool, 3> mask);

struct Kernels {
  // The conv and its backward (with aten_conv's and aten_conv_backward's contracts).
  Tensor (*conv)(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
                 int64_t padding);
  std::tuple<Tensor, Tensor, Tensor> (*conv_backward)(const Tensor& grad_z, const Tensor& x,
                                                      const Tensor& weight, bool has_bias,
                                                      int64_t stride, int64_t padding,
                                                      std::array<bool, 3> mask);
  // Per-channel mean and biased variance of z (0 and 0 for an empty batch).
  std::tuple<Tensor, Tensor> (*channel_stats)(const Tensor& z);
  // out = leaky_relu(z * scale[c] + shift[c] + residual, slope); absent scale/shift mean
  // 1 and 0. `out` may be `z`.
  void (*normalize_act)(const Tensor& z, const OptTensor& scale, const OptTensor& shift,
                        const OptTensor& residual, double slope, const Tensor& out);
  // Per channel: sum(g) and sum(g * xhat), where g = dL/dpre = grad_out * (y > 0 ? 1 : slope),
  // and whether xhat must be recomputed (1) or may be recovered (0) by the recovery rule
  // (math::recovery_accurate; all 0 when xhat is given). Zeros for an empty batch.
  std::tuple<Tensor, Tensor, Tensor> (*backward_reduce)(const BackwardInputs& in);
  // grad_z = k[c] * (g - mean_g[c] - xhat * mean_gx[c]), or g when k is absent;
  // grad_residual (if given) = g.
  void (*backward_apply)(const BackwardInputs& in, const OptTensor& k, const OptTensor& mean_g,
                         const OptTensor& mean_gx, const Tensor& grad_z,
                         const OptTensor& grad_residual);
};

// Registers the vggbench ops for the backend whose TORCH_LIBRARY_IMPL block calls it.
void register_backend(torch::Library& m, const Kernels& kernels);

}  // namespace vggbench
