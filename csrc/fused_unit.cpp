// Schemas of the fused conv -> BatchNorm -> (+residual) -> LeakyReLU ops, and the code
// every backend shares: argument checks, eval-mode folding, running statistics, and the
// backward's control flow. The conv and the passes over activations come from the
// backend's Kernels (cpu/, cuda/; ATen's conv unless the backend has a faster one).
//
// Forward saves nothing activation-sized besides its input and output: backward
// recovers the normalised conv output from the output (see fused_unit_math.h) and
// recomputes the conv only for channels where that recovery would lose precision.
#include "fused_unit.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>

extern "C" {
// `import vggbench._C` loads this library, which runs the registrations below; the
// module itself is empty (the ops live in torch.ops.vggbench).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace vggbench {

Geometry geometry_of(const Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  if (t.is_contiguous()) return {n, c, hw};
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast));
  return {n * hw, c, 1};
}

at::ScalarType stats_dtype(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor aten_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride,
                 int64_t padding) {
  return at::convolution(x, weight, bias, {stride, stride}, {padding, padding}, {1, 1},
                         /*transposed=*/false, {0, 0}, /*groups=*/1);
}

std::tuple<Tensor, Tensor, Tensor> aten_conv_backward(const Tensor& grad_z, const Tensor& x,
                                                      const Tensor& weight, bool has_bias,
                                                      int64_t stride, int64_t padding,
                                                      std::array<bool, 3> mask) {
  const std::array<int64_t, 1> bias_size{weight.size(0)};
  return at::convolution_backward(grad_z, x, weight,
                                  has_bias ? at::OptionalIntArrayRef(bias_size) : std::nullopt,
                                  {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1,
                                  mask);
}

namespace {

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The layout every activation-sized tensor of one call is made contiguous in (the same
// rule as vggbench/ops.py's fake implementations).
at::MemoryFormat memory_format_of(const Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

#define CHECK_ARG(cond, ...) TORCH_CHECK(cond, "vggbench.conv_bn_act: ", __VA_ARGS__)

void check_same_device(const Tensor& t, const Tensor& input, const char* name) {
  CHECK_ARG(t.device() == input.device(), name, " is on ", t.device(), " but input is on ",
            input.device(), "; move both to the same device");
}

void check_channel_vector(const OptTensor& t, const Tensor& input, int64_t channels,
                          const char* name) {
  if (!t) return;
  check_same_device(*t, input, name);
  CHECK_ARG(t->dim() == 1 && t->size(0) == channels, name, " must have shape (", channels,
            ",) to match the conv's output channels, got ", t->sizes());
}

// A per-channel BN tensor: float32 (or the input's dtype) for reduced-precision inputs,
// the input's dtype otherwise.
void check_bn_dtype(const OptTensor& t, const Tensor& input, const char* name) {
  if (!t) return;
  const auto dtype = t->scalar_type();
  CHECK_ARG(dtype == input.scalar_type() || dtype == stats_dtype(input.scalar_type()), name,
            " has dtype ", dtype, " but input has dtype ", input.scalar_type(),
            "; BN parameters and running statistics must be float32 or the input's dtype");
}

void check_forward_args(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& bn_weight, const OptTensor& bn_bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& residual, int64_t stride, int64_t padding,
                        bool use_batch_stats, double eps, double slope) {
  CHECK_ARG(input.dim() == 4, "expected a 4-D input (N, C, H, W), got ", input.dim(),
            "-D with shape ", input.sizes());
  CHECK_ARG(weight.dim() == 4, "expected a 4-D conv weight (K, C, kH, kW), got shape ",
            weight.sizes());
  CHECK_ARG(input.is_floating_point(), "input must be floating point, got ",
            input.scalar_type());
  CHECK_ARG(input.scalar_type() != at::kHalf || input.is_cuda(),
            "float16 is supported on CUDA only; use bfloat16 or float32 on the CPU");
  check_same_device(weight, input, "weight");
  CHECK_ARG(weight.scalar_type() == input.scalar_type(), "weight has dtype ",
            weight.scalar_type(), " but input has dtype ", input.scalar_type(),
            "; cast them to the same dtype (or run under torch.autocast)");
  CHECK_ARG(weight.size(1) == input.size(1), "input has ", input.size(1),
            " channels but the conv weight expects ", weight.size(1), " (weight shape ",
            weight.sizes(), ")");
  CHECK_ARG(weight.size(0) > 0 && weight.size(1) > 0, "the conv needs at least one input and "
            "one output channel, got weight shape ", weight.sizes());
  CHECK_ARG(input.size(0) > 0, "empty batch (input shape ", input.sizes(), ")");
  CHECK_ARG(stride >= 1, "stride must be >= 1, got ", stride);
  CHECK_ARG(padding >= 0, "padding must be >= 0, got ", padding);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t out_h = (input.size(2) + 2 * padding - kh) / stride + 1;
  const int64_t out_w = (input.size(3) + 2 * padding - kw) / stride + 1;
  CHECK_ARG(input.size(2) + 2 * padding >= kh && input.size(3) + 2 * padding >= kw,
            "input of spatial size ", input.size(2), "x", input.size(3), " with padding ",
            padding, " is smaller than the ", kh, "x", kw, " kernel");
  CHECK_ARG(std::isfinite(slope) && slope >= 0, "negative_slope must be finite and >= 0 (the "
            "backward recovers the activation's branch from the output's sign), got ", slope);
  const int64_t channels = weight.size(0);
  if (bias) {
    check_same_device(*bias, input, "bias");
    CHECK_ARG(bias->scalar_type() == input.scalar_type(), "bias has dtype ",
              bias->scalar_type(), " but input has dtype ", input.scalar_type());
  }
  check_channel_vector(bias, input, channels, "bias");
  CHECK_ARG(bn_weight.has_value() == bn_bias.has_value(),
            "bn_weight and bn_bias must be given together (affine BatchNorm) or both omitted");
  for (const auto& [t, name] : {std::pair{&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"},
                                {&running_mean, "running_mean"}, {&running_var, "running_var"}}) {
    check_channel_vector(*t, input, channels, name);
    check_bn_dtype(*t, input, name);
  }
  CHECK_ARG(running_mean.has_value() == running_var.has_value(),
            "running_mean and running_var must be given together");
  if (bn_weight) {
    CHECK_ARG(eps > 0, "eps must be > 0, got ", eps);
    CHECK_ARG(use_batch_stats || running_mean, "eval-mode BatchNorm needs running_mean and "
              "running_var (or use_batch_stats=True)");
    CHECK_ARG(!use_batch_stats || input.size(0) * out_h * out_w > 1,
              "Expected more than 1 value per channel when training, got output size (",
              input.size(0), ", ", channels, ", ", out_h, ", ", out_w, ")");
  }
  if (residual) {
    check_same_device(*residual, input, "residual");
    CHECK_ARG(residual->scalar_type() == input.scalar_type(), "residual has dtype ",
              residual->scalar_type(), " but input has dtype ", input.scalar_type());
    const std::array<int64_t, 4> expected{input.size(0), channels, out_h, out_w};
    CHECK_ARG(residual->sizes() == c10::IntArrayRef(expected), "residual must have the conv "
              "output's shape ", c10::IntArrayRef(expected), ", got ", residual->sizes());
  }
}

Tensor as_stats(const Tensor& t, at::ScalarType dtype) { return t.to(dtype); }

Tensor per_channel(const Tensor& t) { return t.view({1, -1, 1, 1}); }

// Eval-mode BatchNorm folded into the conv: W' = W * s, b' = beta + (b - mean) * s,
// s = gamma / sqrt(var + eps). Returns (W', b', s).
std::tuple<Tensor, Tensor, Tensor> fold_bn(const Tensor& weight, const OptTensor& bias,
                                           const Tensor& gamma, const Tensor& beta,
                                           const Tensor& mean, const Tensor& var, double eps) {
  const auto stats = mean.scalar_type();
  const Tensor scale = as_stats(gamma, stats) * at::rsqrt(var + eps);
  const Tensor centred = bias ? as_stats(*bias, stats) - mean : -mean;
  const Tensor folded_bias = as_stats(beta, stats) + centred * scale;
  return {(weight * scale.view({-1, 1, 1, 1})).to(weight.scalar_type()),
          folded_bias.to(weight.scalar_type()), scale};
}

// Training-mode BN in two halves, so that a distributed caller can merge the statistics
// of all ranks in between: the conv and its per-channel mean and biased variance, ...
std::tuple<Tensor, Tensor, Tensor> conv_stats(const Kernels& k, const Tensor& x,
                                              const Tensor& weight, const OptTensor& bias,
                                              int64_t stride, int64_t padding) {
  const Tensor z = k.conv(x, weight, bias, stride, padding).contiguous(memory_format_of(x));
  auto [mean, var] = k.channel_stats(z);
  return {z, mean, var};
}

// ... then normalisation with given statistics, residual and activation, into `out`
// (which may be z).
void bn_act(const Kernels& k, const Tensor& z, const Tensor& mean, const Tensor& var,
            const Tensor& bn_weight, const Tensor& bn_bias, const OptTensor& residual, double eps,
            double slope, const Tensor& out) {
  const auto stats = mean.scalar_type();
  const Tensor scale = as_stats(bn_weight, stats) * at::rsqrt(var + eps);
  const Tensor shift = as_stats(bn_bias, stats) - mean * scale;
  k.normalize_act(z, scale, shift, residual, slope, out);
}

std::tuple<Tensor, Tensor, Tensor> forward(
    const Kernels& k, const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& residual, int64_t stride, int64_t padding,
    bool use_batch_stats, double eps, double slope) {
  check_forward_args(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                     residual, stride, padding, use_batch_stats, eps, slope);
  const auto fmt = memory_format_of(input);
  const auto stats = stats_dtype(input.scalar_type());
  const Tensor x = input.contiguous(fmt);
  const OptTensor res = residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt;
  const bool batch_norm = bn_weight.has_value();

  if (batch_norm && use_batch_stats) {
    auto [z, mean, var] = conv_stats(k, x, weight, bias, stride, padding);
    bn_act(k, z, mean, var, *bn_weight, *bn_bias, res, eps, slope, z);  // in place: z is ours
    return {z, mean, var};
  }
  Tensor mean, var;
  Tensor z;
  if (batch_norm) {  // eval: running statistics, folded into the conv
    mean = running_mean->to(stats, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(stats, /*non_blocking=*/false, /*copy=*/true);
    auto [folded_weight, folded_bias, scale] =
        fold_bn(weight, bias, *bn_weight, *bn_bias, mean, var, eps);
    z = k.conv(x, folded_weight, folded_bias, stride, padding).contiguous(fmt);
  } else {
    mean = at::empty({0}, x.options().dtype(stats));
    var = at::empty({0}, x.options().dtype(stats));
    z = k.conv(x, weight, bias, stride, padding).contiguous(fmt);
  }
  k.normalize_act(z, std::nullopt, std::nullopt, res, slope, z);
  return {z, mean, var};
}

// Channels whose normalised conv output cannot be recovered from the output to about
// sqrt(machine epsilon): rounding y costs eps * |pre| / |gamma| in xhat, so recovery
// needs |gamma| >= sqrt(eps) * max|pre| (and |gamma| clear of subnormals); slope 0
// loses the negative branch entirely.
Tensor unrecoverable_channels(const Tensor& gamma, const Tensor& max_abs_pre,
                              at::ScalarType dtype) {
  double eps = 0, tiny = 0;
  if (dtype == at::kDouble) {
    eps = std::numeric_limits<double>::epsilon(), tiny = std::numeric_limits<double>::min();
  } else if (dtype == at::kFloat) {
    eps = std::numeric_limits<float>::epsilon(), tiny = std::numeric_limits<float>::min();
  } else if (dtype == at::kHalf) {
    eps = 0x1p-10, tiny = 0x1p-14;
  } else {  // bfloat16
    eps = 0x1p-7, tiny = std::numeric_limits<float>::min();
  }
  const double tolerance = std::sqrt(eps);
  const Tensor size = at::abs(gamma);
  return at::logical_not((size >= max_abs_pre * tolerance) & (size >= tiny / tolerance));
}

// xhat for every channel when some cannot be recovered: recovered where possible,
// recomputed from the saved input (one conv over those channels) elsewhere.
Tensor xhat_with_fallback(const Kernels& k, const BackwardInputs& in, const Tensor& fallback,
                          const Tensor& x, const Tensor& weight, const OptTensor& bias,
                          const Tensor& mean, const Tensor& invstd, int64_t stride,
                          int64_t padding) {
  const auto fmt = memory_format_of(in.out);
  const Tensor channels = at::nonzero(fallback).squeeze(1);
  const bool all = channels.numel() == fallback.numel();
  const Tensor w = all ? weight : weight.index_select(0, channels);
  const OptTensor b = bias && !all ? OptTensor(bias->index_select(0, channels)) : bias;
  const Tensor mu = all ? mean : mean.index_select(0, channels);
  const Tensor r = all ? invstd : invstd.index_select(0, channels);
  const Tensor recomputed =
      ((k.conv(x, w, b, stride, padding) - per_channel(mu)) * per_channel(r)).to(in.out.scalar_type());
  if (all) return recomputed.contiguous(fmt);
  const Tensor y = in.out.to(mean.scalar_type());
  Tensor pre = at::where(y > 0, y, y / in.slope);
  if (in.residual) pre = pre - *in.residual;
  Tensor xhat = (pre * per_channel(in.recover_scale) - per_channel(in.recover_shift))
                    .to(in.out.scalar_type())
                    .contiguous(fmt);
  return xhat.index_copy_(1, channels, recomputed);
}

Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

Tensor grad_or_empty(bool wanted, const Tensor& grad, const Tensor& like) {
  return wanted ? grad.to(like.scalar_type()).contiguous(memory_format_of(like))
                : empty_grad(like);
}

BackwardInputs backward_inputs(const Tensor& grad_out, const Tensor& out,
                               const OptTensor& residual, at::MemoryFormat fmt, double slope) {
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.device() == out.device() &&
                  grad_out.scalar_type() == out.scalar_type(),
              "vggbench.conv_bn_act_backward: grad_out (", grad_out.scalar_type(), ", ",
              grad_out.device(), ", shape ", grad_out.sizes(), ") does not match the output (",
              out.scalar_type(), ", ", out.device(), ", shape ", out.sizes(), ")");
  return {grad_out.contiguous(fmt), out.contiguous(fmt),
          residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt,
          std::nullopt, Tensor(), Tensor(), slope};
}

// Training-mode BN backward's per-channel sums, sum(g) and sum(g * xhat), over this call's
// batch. Sets in's recovery coefficients, and in.xhat when some channel's xhat cannot be
// recovered from the output and is recomputed instead.
std::tuple<Tensor, Tensor> bn_backward_sums(const Kernels& k, BackwardInputs& in, const Tensor& x,
                                            const Tensor& weight, const OptTensor& bias,
                                            const Tensor& bn_weight, const Tensor& bn_bias,
                                            const Tensor& mean, const Tensor& var, int64_t stride,
                                            int64_t padding, double eps) {
  const auto stats = mean.scalar_type();
  const Tensor gamma = as_stats(bn_weight, stats), beta = as_stats(bn_bias, stats);
  in.recover_scale = at::reciprocal(gamma);
  in.recover_shift = beta * in.recover_scale;
  Tensor sum_g, sum_gx, max_abs_pre;
  bool fallback_needed = in.slope == 0;
  Tensor fallback = at::ones(gamma.sizes(), gamma.options().dtype(at::kBool));
  if (!fallback_needed) {
    std::tie(sum_g, sum_gx, max_abs_pre) = k.backward_reduce(in);
    fallback = unrecoverable_channels(gamma, max_abs_pre, in.out.scalar_type());
    fallback_needed = fallback.any().item<bool>();
  }
  if (fallback_needed) {
    in.xhat = xhat_with_fallback(k, in, fallback, x, weight, bias, mean, at::rsqrt(var + eps),
                                 stride, padding);
    std::tie(sum_g, sum_gx, max_abs_pre) = k.backward_reduce(in);
  }
  return {sum_g, sum_gx};
}

// `reduced_sums`: sum(g) and sum(g * xhat) over the whole (distributed) batch of
// `reduced_count` values per channel, replacing this call's own sums in the input
// gradient (synchronised BN); the BN parameters' gradients stay this call's.
Grads backward(const Kernels& k, const Tensor& grad_out, const Tensor& out, const Tensor& input,
               const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
               const OptTensor& bn_bias, const OptTensor& residual, const Tensor& mean,
               const Tensor& var, int64_t stride, int64_t padding, bool use_batch_stats,
               double eps, double slope, std::array<bool, 6> mask, const OptTensor& reduced_sums,
               int64_t reduced_count) {
  const auto fmt = memory_format_of(input);
  const auto stats = mean.scalar_type();
  const Tensor x = input.contiguous(fmt);
  BackwardInputs in = backward_inputs(grad_out, out, residual, fmt, slope);
  const bool batch_norm = bn_weight.has_value();
  const bool train_bn = batch_norm && use_batch_stats;
  const int64_t channels = weight.size(0);
  TORCH_CHECK(!reduced_sums || (train_bn && reduced_sums->dim() == 1 &&
                                reduced_sums->size(0) == 2 * channels && reduced_count > 1),
              "vggbench.conv_bn_act_backward: reduced_sums must be the (", 2 * channels,
              ",) sums of a training-mode BN call over more than 1 value per channel");
  Tensor grad_z = at::empty_like(in.out);
  OptTensor grad_residual;
  if (residual && mask[5]) grad_residual = at::empty_like(in.out);
  Tensor grad_gamma, grad_beta;

  if (train_bn) {
    std::tie(grad_beta, grad_gamma) = bn_backward_sums(k, in, x, weight, bias, *bn_weight, *bn_bias,
                                                       mean, var, stride, padding, eps);
    Tensor sum_g = grad_beta, sum_gx = grad_gamma;
    double count = static_cast<double>(geometry_of(in.out).count());
    if (reduced_sums) {
      const Tensor sums = reduced_sums->to(stats);
      sum_g = sums.narrow(0, 0, channels), sum_gx = sums.narrow(0, channels, channels);
      count = static_cast<double>(reduced_count);
    }
    const Tensor k_scale = as_stats(*bn_weight, stats) * at::rsqrt(var + eps);
    k.backward_apply(in, k_scale, sum_g / count, sum_gx / count, grad_z, grad_residual);
  } else {
    k.backward_apply(in, std::nullopt, std::nullopt, std::nullopt, grad_z, grad_residual);
  }

  Tensor conv_weight = weight;
  OptTensor conv_bias = bias;
  Tensor fold_scale;
  if (batch_norm && !use_batch_stats) {
    std::tie(conv_weight, conv_bias, fold_scale) =
        fold_bn(weight, bias, *bn_weight, *bn_bias, mean, var, eps);
  }
  const bool eval_bn = batch_norm && !use_batch_stats;
  const bool want_bias = bias && mask[2];
  const bool want_bn = batch_norm && (mask[3] || mask[4]);
  const std::array<bool, 3> conv_mask{mask[0], mask[1] || (eval_bn && mask[3]),
                                      want_bias || (eval_bn && want_bn)};
  auto [grad_x, grad_w, grad_b] = k.conv_backward(grad_z, x, conv_weight, conv_bias.has_value(),
                                                   stride, padding, conv_mask);

  if (eval_bn) {  // chain rule through W' = W * s and b' = beta + (b - mean) * s
    const Tensor invstd = at::rsqrt(var + eps);
    const Tensor grad_folded_bias = conv_mask[2] ? as_stats(grad_b, stats) : Tensor();
    if (mask[3]) {
      Tensor grad_scale = at::sum(as_stats(grad_w, stats) * as_stats(weight, stats), {1, 2, 3});
      const Tensor centred = bias ? as_stats(*bias, stats) - mean : -mean;
      grad_gamma = (grad_scale + grad_folded_bias * centred) * invstd;
    }
    if (mask[4]) grad_beta = grad_folded_bias;
    if (mask[1]) grad_w = as_stats(grad_w, stats) * fold_scale.view({-1, 1, 1, 1});
    if (want_bias) grad_b = grad_folded_bias * fold_scale;
  }
  const auto param_grad = [&](bool wanted, const Tensor& grad, const OptTensor& param) {
    return param ? grad_or_empty(wanted, grad, *param) : empty_grad(input);
  };
  return {grad_or_empty(mask[0], grad_x, input), grad_or_empty(mask[1], grad_w, weight),
          param_grad(want_bias, grad_b, bias), param_grad(batch_norm && mask[3], grad_gamma, bn_weight),
          param_grad(batch_norm && mask[4], grad_beta, bn_bias),
          param_grad(grad_residual.has_value(), grad_residual.value_or(Tensor()), residual)};
}

// nn.BatchNorm2d's running-statistics update: num_batches_tracked += 1, then
// running = (1 - f) * running + f * batch with f = momentum, or 1 / num_batches_tracked
// (a cumulative average) when momentum is None; running_var takes the unbiased variance.
void update_running_stats(Tensor& running_mean, Tensor& running_var, Tensor& num_batches_tracked,
                          const Tensor& batch_mean, const Tensor& batch_var, int64_t count,
                          std::optional<double> momentum) {
  TORCH_CHECK(count > 1, "vggbench.update_running_stats_: need more than 1 value per channel, "
              "got ", count);
  TORCH_CHECK(running_mean.sizes() == batch_mean.sizes() && running_var.sizes() == batch_var.sizes(),
              "vggbench.update_running_stats_: running statistics of shape ", running_mean.sizes(),
              " do not match batch statistics of shape ", batch_mean.sizes());
  TORCH_CHECK(!momentum || (*momentum >= 0 && *momentum <= 1),
              "vggbench.update_running_stats_: momentum must be in [0, 1], got ", *momentum);
  num_batches_tracked.add_(1);
  const double factor = momentum ? *momentum : 1.0 / num_batches_tracked.item<double>();
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  running_mean.copy_(batch_mean * factor + running_mean * (1 - factor));
  running_var.copy_(batch_var * (unbias * factor) + running_var * (1 - factor));
}

}  // namespace

void register_backend(torch::Library& m, const Kernels& kernels) {
  const Kernels* k = &kernels;
  m.impl("conv_bn_act",
         [k](const Tensor& input, const Tensor& weight, const OptTensor& bias,
             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
             const OptTensor& running_var, const OptTensor& residual, int64_t stride,
             int64_t padding, bool use_batch_stats, double eps, double negative_slope) {
           return forward(*k, input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          residual, stride, padding, use_batch_stats, eps, negative_slope);
         });
  m.impl("conv_bn_act_backward",
         [k](const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
             const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
             const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
             int64_t padding, bool use_batch_stats, double eps, double negative_slope,
             std::array<bool, 6> output_mask, const OptTensor& reduced_sums,
             int64_t reduced_count) {
           return backward(*k, grad_out, out, input, weight, bias, bn_weight, bn_bias, residual,
                           mean, var, stride, padding, use_batch_stats, eps, negative_slope,
                           output_mask, reduced_sums, reduced_count);
         });
  m.impl("conv_stats", [k](const Tensor& input, const Tensor& weight, const OptTensor& bias,
                           int64_t stride, int64_t padding) {
    check_forward_args(input, weight, bias, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                       std::nullopt, stride, padding, true, 1e-5, 0.0);
    return conv_stats(*k, input.contiguous(memory_format_of(input)), weight, bias, stride, padding);
  });
  m.impl("bn_act", [k](const Tensor& z, const Tensor& mean, const Tensor& var,
                       const Tensor& bn_weight, const Tensor& bn_bias, const OptTensor& residual,
                       double eps, double negative_slope) {
    const auto fmt = memory_format_of(z);
    TORCH_CHECK(z.dim() == 4 && mean.sizes() == var.sizes() && mean.dim() == 1 &&
                    mean.size(0) == z.size(1) && (!residual || residual->sizes() == z.sizes()),
                "vggbench.bn_act: expected z (N, C, H, W), mean and var (C,) and a residual "
                "shaped like z; got z ", z.sizes(), ", mean ", mean.sizes(), ", var ", var.sizes());
    const OptTensor res = residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt;
    const auto stats = stats_dtype(z.scalar_type());
    Tensor out = at::empty_like(z, fmt);
    bn_act(*k, z.contiguous(fmt), mean.to(stats), var.to(stats), bn_weight, bn_bias, res, eps,
           negative_slope, out);
    return out;
  });
  m.impl("conv_bn_act_backward_sums",
         [k](const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
             const OptTensor& bias, const Tensor& bn_weight, const Tensor& bn_bias,
             const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
             int64_t padding, double eps, double negative_slope) {
           const auto fmt = memory_format_of(input);
           BackwardInputs in = backward_inputs(grad_out, out, residual, fmt, negative_slope);
           auto [sum_g, sum_gx] = bn_backward_sums(*k, in, input.contiguous(fmt), weight, bias,
                                                   bn_weight, bn_bias, mean, var, stride, padding, eps);
           return at::cat({sum_g, sum_gx});
         });
  m.impl("update_running_stats_", &update_running_stats);
}

}  // namespace vggbench

TORCH_LIBRARY(vggbench, m) {
  // out, and the per-channel mean and biased variance that normalised it (the batch's
  // in training, copies of the running ones in eval; empty without BN), in float32
  // (float64 for float64 inputs).
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, Tensor? residual, "
      "int stride, int padding, bool use_batch_stats, float eps, float negative_slope)"
      " -> (Tensor, Tensor, Tensor)");
  // Gradients for (input, weight, bias, bn_weight, bn_bias, residual); an entry whose
  // mask is False or whose input is absent comes back as an empty tensor.
  m.def(
      "conv_bn_act_backward(Tensor grad_out, Tensor out, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, Tensor mean, "
      "Tensor var, int stride, int padding, bool use_batch_stats, float eps, "
      "float negative_slope, bool[6] output_mask, Tensor? reduced_sums=None, "
      "int reduced_count=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training-mode BN split where a distributed caller merges statistics or sums across
  // ranks (synchronised BN): the conv output and its per-channel mean and biased variance;
  // the normalisation (+ residual) and activation with given statistics; and the
  // backward's per-channel [sum(g), sum(g * xhat)] (2C) to pass back as reduced_sums.
  m.def("conv_stats(Tensor input, Tensor weight, Tensor? bias, int stride, int padding)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bn_act(Tensor z, Tensor mean, Tensor var, Tensor bn_weight, Tensor bn_bias, "
        "Tensor? residual, float eps, float negative_slope) -> Tensor");
  m.def(
      "conv_bn_act_backward_sums(Tensor grad_out, Tensor out, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor bn_weight, Tensor bn_bias, Tensor? residual, Tensor mean, "
      "Tensor var, int stride, int padding, float eps, float negative_slope) -> Tensor");
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor batch_mean, Tensor batch_var, int count, "
      "float? momentum) -> ()");
}
