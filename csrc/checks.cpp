// Argument checks of every vggbench op (see checks.h): one clear, actionable line each.
#include "checks.h"

#include <c10/util/Exception.h>

#include <array>
#include <cmath>

namespace vggbench::checks {
namespace {

#define CHECK_ARG(op, cond, ...) TORCH_CHECK(cond, "vggbench.", op, ": ", __VA_ARGS__)

void same_device(const char* op, const Tensor& t, const Tensor& input, const char* name,
                 const char* input_name = "input") {
  CHECK_ARG(op, t.device() == input.device(), name, " is on ", t.device(), " but ", input_name,
            " is on ", input.device(), "; move both to the same device");
}

void same_dtype(const char* op, const Tensor& t, const Tensor& input, const char* name,
                const char* input_name = "input") {
  CHECK_ARG(op, t.scalar_type() == input.scalar_type(), name, " has dtype ", t.scalar_type(),
            " but ", input_name, " has dtype ", input.scalar_type(),
            "; cast them to the same dtype (or run under torch.autocast)");
}

// A per-channel vector of `length` entries on `like`'s device. `stats_only`: in the
// statistics dtype (float32, float64 for float64 activations); otherwise that or the
// activation dtype (BN parameters and running statistics).
void channel_vector(const char* op, const OptTensor& t, const Tensor& like, int64_t length,
                    const char* name, bool stats_only = false) {
  if (!t) return;
  same_device(op, *t, like, name);
  CHECK_ARG(op, t->dim() == 1 && t->size(0) == length, name, " must have shape (", length,
            ",) to match the conv's output channels, got ", t->sizes());
  const auto dtype = t->scalar_type(), stats = stats_dtype(like.scalar_type());
  CHECK_ARG(op, dtype == stats || (!stats_only && dtype == like.scalar_type()), name,
            " has dtype ", dtype, " but the activations have dtype ", like.scalar_type(), "; ",
            stats_only ? "statistics must be " : "BN parameters and running statistics must be ",
            stats, stats_only ? "" : " or the activations' dtype");
}

void activation(const char* op, const Tensor& t, const char* name) {
  CHECK_ARG(op, t.dim() == 4, "expected a 4-D ", name, " (N, C, H, W), got ", t.dim(),
            "-D with shape ", t.sizes());
  CHECK_ARG(op, t.is_floating_point(), name, " must be floating point, got ", t.scalar_type());
  CHECK_ARG(op, t.scalar_type() != at::kHalf || t.is_cuda(),
            "float16 is supported on CUDA only; use bfloat16 or float32 on the CPU");
}

// An activation-sized tensor shaped, typed and placed like `like`.
void like_activation(const char* op, const OptTensor& t, const Tensor& like, const char* name,
                     const char* like_name) {
  if (!t) return;
  same_device(op, *t, like, name, like_name);
  same_dtype(op, *t, like, name, like_name);
  CHECK_ARG(op, t->sizes() == like.sizes(), name, " must have the ", like_name, "'s shape ",
            like.sizes(), ", got ", t->sizes());
}

void slope_and_eps(const char* op, double slope, double eps) {
  CHECK_ARG(op, std::isfinite(slope) && slope >= 0, "negative_slope must be finite and >= 0 (the "
            "backward recovers the activation's branch from the output's sign), got ", slope);
  CHECK_ARG(op, eps > 0 && std::isfinite(eps), "eps must be > 0 and finite, got ", eps);
}

// The conv's arguments; returns its output shape.
std::array<int64_t, 4> conv(const char* op, const Tensor& input, const Tensor& weight,
                            const OptTensor& bias, int64_t stride, int64_t padding) {
  activation(op, input, "input");
  CHECK_ARG(op, weight.dim() == 4, "expected a 4-D conv weight (K, C, kH, kW), got shape ",
            weight.sizes());
  same_device(op, weight, input, "weight");
  same_dtype(op, weight, input, "weight");
  CHECK_ARG(op, weight.size(1) == input.size(1), "input has ", input.size(1),
            " channels but the conv weight expects ", weight.size(1), " (weight shape ",
            weight.sizes(), ")");
  CHECK_ARG(op, weight.size(0) > 0 && weight.size(1) > 0, "the conv needs at least one input "
            "and one output channel, got weight shape ", weight.sizes());
  CHECK_ARG(op, stride >= 1, "stride must be >= 1, got ", stride);
  CHECK_ARG(op, padding >= 0, "padding must be >= 0, got ", padding);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  CHECK_ARG(op, input.size(2) + 2 * padding >= kh && input.size(3) + 2 * padding >= kw,
            "input of spatial size ", input.size(2), "x", input.size(3), " with padding ", padding,
            " is smaller than the ", kh, "x", kw, " kernel");
  if (bias) {
    same_device(op, *bias, input, "bias");
    same_dtype(op, *bias, input, "bias");
    CHECK_ARG(op, bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
              weight.size(0), ",) to match the conv's output channels, got ", bias->sizes());
  }
  return {input.size(0), weight.size(0), (input.size(2) + 2 * padding - kh) / stride + 1,
          (input.size(3) + 2 * padding - kw) / stride + 1};
}

// Training-mode BN over count values per channel: native's rule (0 values are allowed:
// an empty batch leaves the running statistics as they are).
void batch_count(const char* op, const std::array<int64_t, 4>& shape) {
  CHECK_ARG(op, shape[0] * shape[2] * shape[3] != 1,
            "Expected more than 1 value per channel when training, got output size (", shape[0],
            ", ", shape[1], ", ", shape[2], ", ", shape[3], ")");
}

}  // namespace

void conv_bn_act(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                 const OptTensor& bn_weight, const OptTensor& bn_bias,
                 const OptTensor& running_mean, const OptTensor& running_var,
                 const OptTensor& residual, int64_t stride, int64_t padding, bool use_batch_stats,
                 double eps, double slope) {
  const char* op = "conv_bn_act";
  const auto shape = conv(op, input, weight, bias, stride, padding);
  slope_and_eps(op, slope, eps);
  const int64_t channels = weight.size(0);
  CHECK_ARG(op, bn_weight.has_value() == bn_bias.has_value(),
            "bn_weight and bn_bias must be given together (affine BatchNorm) or both omitted");
  CHECK_ARG(op, running_mean.has_value() == running_var.has_value(),
            "running_mean and running_var must be given together");
  for (const auto& [t, name] : {std::pair{&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"},
                                {&running_mean, "running_mean"}, {&running_var, "running_var"}}) {
    channel_vector(op, *t, input, channels, name);
  }
  if (bn_weight) {
    CHECK_ARG(op, use_batch_stats || running_mean, "eval-mode BatchNorm needs running_mean and "
              "running_var (or use_batch_stats=True)");
    if (use_batch_stats) batch_count(op, shape);
  }
  if (residual) {
    same_device(op, *residual, input, "residual");
    same_dtype(op, *residual, input, "residual");
    CHECK_ARG(op, residual->sizes() == c10::IntArrayRef(shape), "residual must have the conv "
              "output's shape ", c10::IntArrayRef(shape), ", got ", residual->sizes());
  }
}

void conv_stats(const Tensor& input, const Tensor& weight, const OptTensor& bias, int64_t stride,
                int64_t padding) {
  conv("_conv_stats", input, weight, bias, stride, padding);
}

void bn_act(const Tensor& z, const Tensor& mean, const Tensor& var, const Tensor& bn_weight,
            const Tensor& bn_bias, const OptTensor& bias, const OptTensor& residual, double eps,
            double slope) {
  const char* op = "_bn_act";
  activation(op, z, "z");
  slope_and_eps(op, slope, eps);
  const int64_t channels = z.size(1);
  channel_vector(op, mean, z, channels, "mean", /*stats_only=*/true);
  channel_vector(op, var, z, channels, "var", /*stats_only=*/true);
  channel_vector(op, bn_weight, z, channels, "bn_weight");
  channel_vector(op, bn_bias, z, channels, "bn_bias");
  if (bias) {
    same_dtype(op, *bias, z, "bias", "z");
    channel_vector(op, bias, z, channels, "bias");
  }
  like_activation(op, residual, z, "residual", "z");
}

void backward(const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
              const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
              const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
              int64_t padding, bool use_batch_stats, double eps, double slope,
              const OptTensor& local_sums, const OptTensor& reduced_sums, const OptTensor& kept_z) {
  const char* op = "_conv_bn_act_backward";
  const auto shape = conv(op, input, weight, bias, stride, padding);
  slope_and_eps(op, slope, eps);
  CHECK_ARG(op, out.sizes() == c10::IntArrayRef(shape), "out must have the conv output's shape ",
            c10::IntArrayRef(shape), ", got ", out.sizes());
  same_device(op, out, input, "out");
  same_dtype(op, out, input, "out");
  like_activation(op, grad_out, out, "grad_out", "out");
  like_activation(op, residual, out, "residual", "out");
  const int64_t channels = weight.size(0);
  CHECK_ARG(op, bn_weight.has_value() == bn_bias.has_value(),
            "bn_weight and bn_bias must be given together (affine BatchNorm) or both omitted");
  channel_vector(op, bn_weight, input, channels, "bn_weight");
  channel_vector(op, bn_bias, input, channels, "bn_bias");
  const int64_t stats_length = bn_weight ? channels : 0;
  channel_vector(op, mean, input, stats_length, "mean", /*stats_only=*/true);
  channel_vector(op, var, input, stats_length, "var", /*stats_only=*/true);
  CHECK_ARG(op, local_sums.has_value() == reduced_sums.has_value(),
            "local_sums and reduced_sums must be given together");
  if (local_sums) {
    CHECK_ARG(op, bn_weight && use_batch_stats, "local_sums and reduced_sums need training-mode "
              "BatchNorm (use_batch_stats=True with bn_weight)");
    channel_vector(op, local_sums, input, 2 * channels + 2, "local_sums", /*stats_only=*/true);
    channel_vector(op, reduced_sums, input, 2 * channels + 1, "reduced_sums", /*stats_only=*/true);
  }
  if (kept_z) {
    CHECK_ARG(op, bn_weight && use_batch_stats && !local_sums, "kept_z needs training-mode BatchNorm "
              "(use_batch_stats=True with bn_weight) without local_sums and reduced_sums");
    like_activation(op, kept_z, out, "kept_z", "out");
  }
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& batch_mean,
                          const Tensor& batch_var, const OptTensor& count, int64_t batch_count,
                          std::optional<double> momentum) {
  const char* op = "update_running_stats_";
  CHECK_ARG(op, batch_mean.dim() == 1 && batch_mean.is_floating_point(),
            "batch_mean must be a floating-point vector, got ", batch_mean.scalar_type(),
            " of shape ", batch_mean.sizes());
  CHECK_ARG(op, running_mean.sizes() == batch_mean.sizes() && running_var.sizes() == batch_mean.sizes(),
            "running statistics of shape ", running_mean.sizes(), " and ", running_var.sizes(),
            " do not match batch statistics of shape ", batch_mean.sizes());
  CHECK_ARG(op, batch_var.sizes() == batch_mean.sizes() &&
                    batch_var.scalar_type() == batch_mean.scalar_type(),
            "batch_var (", batch_var.scalar_type(), ", shape ", batch_var.sizes(),
            ") must match batch_mean (", batch_mean.scalar_type(), ", shape ", batch_mean.sizes(), ")");
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, {&running_var, "running_var"},
                                {&num_batches_tracked, "num_batches_tracked"}, {&batch_var, "batch_var"}}) {
    same_device(op, *t, batch_mean, name, "batch_mean");
  }
  CHECK_ARG(op, batch_mean.scalar_type() == at::kFloat || batch_mean.scalar_type() == at::kDouble,
            "batch statistics must be float32 or float64, got ", batch_mean.scalar_type());
  CHECK_ARG(op, running_mean.is_floating_point() && running_var.is_floating_point(),
            "running statistics must be floating point, got ", running_mean.scalar_type(), " and ",
            running_var.scalar_type());
  CHECK_ARG(op, running_mean.is_contiguous() && running_var.is_contiguous() && batch_mean.is_contiguous() &&
                    batch_var.is_contiguous(),
            "running and batch statistics must be contiguous vectors (they are updated in place); "
            "pass .contiguous() copies");
  CHECK_ARG(op, num_batches_tracked.dim() == 0 && !num_batches_tracked.is_floating_point() &&
                    num_batches_tracked.scalar_type() != at::kBool,
            "num_batches_tracked must be a 0-d integer tensor, got ", num_batches_tracked.scalar_type(),
            " of shape ", num_batches_tracked.sizes());
  if (count) {
    same_device(op, *count, batch_mean, "count", "batch_mean");
    CHECK_ARG(op, count->dim() == 0 && count->scalar_type() == batch_mean.scalar_type(),
              "count must be a 0-d tensor of batch_mean's dtype ", batch_mean.scalar_type(), ", got ",
              count->scalar_type(), " of shape ", count->sizes());
  } else {
    CHECK_ARG(op, batch_count >= 0, "give the number of values per channel: count (a 0-d tensor) "
              "or batch_count >= 0, got batch_count ", batch_count);
  }
  CHECK_ARG(op, !momentum || (*momentum >= 0 && *momentum <= 1), "momentum must be in [0, 1], got ",
            momentum.value_or(0));
}

}  // namespace vggbench::checks
