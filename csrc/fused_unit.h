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

// Per-channel operands of a normalisation z -> z * scale + shift (z: a conv output without
// its bias), contiguous, in the statistics dtype except the conv's bias (the activation
// dtype, as the conv takes it); the backend computes (scale, shift) with
// math::channel_affine. Without `normalize`: scale 1, shift = bias (no BatchNorm). With it:
// scale = gamma / sqrt(var + eps), shift = beta + (bias - mean) * scale, where an absent
// gamma, beta or bias means 1, 0, 0 (gamma and beta absent: xhat itself).
struct ChannelAffine {
  bool normalize;
  OptTensor gamma, beta, mean, var, bias;
  double eps;

  // Whether the CPU's normalisations compute z * scale + shift at all: without it z passes as
  // it is (so -0 stays -0, which z * 1 + 0 would make +0).
  bool transforms() const { return normalize || bias.has_value(); }
};

// The activation-sized inputs of the backward passes, and training-mode BN's per-channel
// operands (statistics dtype; undefined without it). xhat (the normalised conv output) is
// recovered element by element from the output when `xhat` is absent:
//   pre = y > 0 ? y : y / slope,   xhat = (pre - residual) / gamma - beta / gamma
// (math::recovery_coefficients), under the recovery rule of fused_unit_math.h. When
// `xhat_affine` is set, `xhat` holds the conv output z and the passes normalise it in their
// registers, as normalize_act would: xhat = z * scale + shift (never rounded to z's dtype).
struct BackwardInputs {
  Tensor grad_out, out;
  OptTensor residual;
  OptTensor xhat;
  std::optional<ChannelAffine> xhat_affine;
  Tensor gamma, beta, mean, var;
  double eps, slope;
};

// ATen's conv and conv backward (grads of input, weight, bias as `mask` asks; undefined
// where not asked): the Kernels default, and the fallback of a backend's own conv.
Tensor aten_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
                 int64_t padding);
std::tuple<Tensor, Tensor, Tensor> aten_conv_backward(const Tensor& grad_z, const Tensor& x,
                                                      const Tensor& weight, bool has_bias,
                                                      int64_t stride, int64_t padding,
                                                      std::array<bool, 3> mask);

// What a backend provides. Each member besides the convs is one pass over the activations
// with its per-channel finish (on the CPU one function; on CUDA one kernel, whose last block
// per channel finishes a reduction), computing the per-channel maths itself with the formulas
// of fused_unit_math.h: the orchestration (fused_unit.cpp) dispatches no other op around
// them. A training unit: forward = conv + batch_stats + normalize_act (conv_stats: the first
// two in one pass; + the running-stats update, a fourth member); backward = backward_reduce +
// backward_apply + conv_backward (backward_reduce + apply_weight_grad where only the conv
// weight's gradient is wanted and the backend has that pass).
struct Kernels {
  // The conv and its backward (with aten_conv's and aten_conv_backward's contracts).
  Tensor (*conv)(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
                 int64_t padding);
  std::tuple<Tensor, Tensor, Tensor> (*conv_backward)(const Tensor& grad_z, const Tensor& x,
                                                      const Tensor& weight, bool has_bias,
                                                      int64_t stride, int64_t padding,
                                                      std::array<bool, 3> mask);
  // Per-channel mean and biased variance of z + bias (0 and 0 for an empty batch), in the
  // statistics dtype; bias (z's dtype) may be absent.
  std::tuple<Tensor, Tensor> (*batch_stats)(const Tensor& z, const OptTensor& bias);
  // The conv without its bias and batch_stats of its output in one pass, (z, mean, var),
  // where the backend has that for these operands; nullopt (or a null member): the caller
  // runs conv, then batch_stats.
  std::optional<std::tuple<Tensor, Tensor, Tensor>> (*conv_stats)(const Tensor& x, const Tensor& weight,
                                                                  const OptTensor& bias, int64_t stride,
                                                                  int64_t padding);
  // out = leaky_relu(z * scale[c] + shift[c] + residual, slope), (scale, shift) from
  // `affine`. `out` may be `z`.
  void (*normalize_act)(const Tensor& z, const ChannelAffine& affine, const OptTensor& residual,
                        double slope, const Tensor& out);
  // nn.BatchNorm2d's running-statistics update (ops.cpp's update_running_stats_), over
  // `count` values per channel (a 0-d tensor of the statistics dtype) or, without it,
  // `batch_count`; factor = momentum, or 1 / num_batches_tracked after its increment.
  void (*update_running_stats)(const Tensor& running_mean, const Tensor& running_var,
                               const Tensor& num_batches_tracked, const Tensor& batch_mean,
                               const Tensor& batch_var, const OptTensor& count,
                               int64_t batch_count, std::optional<double> momentum);
  // Per channel: sum(g) and sum(g * xhat), where g = dL/dpre = grad_out * (y > 0 ? 1 : slope),
  // and whether xhat must be recomputed (1) or may be recovered (0) by the recovery rule
  // (math::recovery_accurate; all 0 when xhat is given). Zeros for an empty batch.
  std::tuple<Tensor, Tensor, Tensor> (*backward_reduce)(const BackwardInputs& in);
  // With training-mode BN (in.gamma defined): grad_z = k (g - mean_g - xhat mean_gx) with
  // (k, mean_g, mean_gx) = math::bn_backward_coefficients of the sums over `count` values
  // (a 0-d tensor: all ranks'; absent: this batch's); otherwise grad_z = g.
  // grad_residual (if given) = g.
  void (*backward_apply)(const BackwardInputs& in, const OptTensor& sum_g, const OptTensor& sum_gx,
                         const OptTensor& count, const Tensor& grad_z,
                         const OptTensor& grad_residual);
  // xhat recovered (as backward_reduce recovers it) for every channel into `out` (out's
  // shape, layout and dtype), for a recompute of the flagged channels only; null where the
  // backend recomputes whole units (CUDA, whose default policy recomputes every unit).
  void (*recover_xhat)(const BackwardInputs& in, const Tensor& out);
  // Whether backward_reduce and backward_apply take in.xhat_affine (a recompute then skips
  // its normalise pass); without it they need xhat itself.
  bool reads_xhat_affine;
  // With training-mode BN: backward_apply's grad_z (same arguments; no grad_residual)
  // reduced at once into the weight gradient of the conv of x with `weight` (no bias), as
  // conv_backward's, without storing grad_z: where the backend has that for these operands
  // (nullopt, or a null member: backward_apply, then conv_backward).
  std::optional<Tensor> (*apply_weight_grad)(const BackwardInputs& in, const OptTensor& sum_g,
                                             const OptTensor& sum_gx, const OptTensor& count,
                                             const Tensor& x, const Tensor& weight, int64_t stride,
                                             int64_t padding);
  // The conv's weight gradient from grad_z with apply_weight_grad's kernel (its bits), where
  // that applies (nullopt, or a null member: conv_backward's).
  std::optional<Tensor> (*weight_grad)(const Tensor& grad_z, const Tensor& x, const Tensor& weight,
                                       int64_t stride, int64_t padding);
  // normalize_act(conv(x, weight) (no bias), affine, no residual, slope) in one pass, with the
  // same bits, where the backend has that for these operands (nullopt, or a null member:
  // conv, then normalize_act): the eval forward, and the forward without BN.
  std::optional<Tensor> (*conv_act)(const Tensor& x, const Tensor& weight, int64_t stride, int64_t padding,
                                    const ChannelAffine& affine, double slope);
};

// Registers the vggbench ops for the backend whose TORCH_LIBRARY_IMPL block calls it.
void register_backend(torch::Library& m, const Kernels& kernels);

}  // namespace vggbench
