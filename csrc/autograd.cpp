// conv_bn_act's autograd, in C++ so that a call runs no Python on its way to the kernels (the
// Python autograd.Function of torch.library.register_autograd cost ~0.1 ms per forward and
// backward: as much as the op's own forward on the study's 8x8 maps).
// The forward redispatches to the backend below autograd and saves only its output, its
// input, the parameters and the statistics that normalised (the running ones in eval: an
// in-place update before backward is caught by autograd's version check, as with native
// BatchNorm); the backward is the _conv_bn_act_backward op, called through the dispatcher.
//
// The backward policy (vggbench/ops.py's RECOMPUTE, set through _set_recompute): "keep",
// read by the forward, keeps training-mode BN's conv output z for the backward (computed by
// _conv_stats and normalised by _bn_act: conv_bn_act's bits), so that xhat comes from it; the
// backward reads the rest when it runs, for units whose z was not kept: "rule" recovers xhat
// where the recovery rule allows, "all" always recomputes it (no host read: CUDA graphs).
// "auto" keeps z for bfloat16 and for convs of few input channels on the CPU, and is "rule"
// on the CPU and "all" elsewhere.
//
// The only file with the autograd headers (they are heavy to compile).
#include "checks.h"
#include "fused_unit.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <string>

namespace vggbench {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Recompute { kAuto, kRule, kAll, kKeep };
std::atomic<Recompute> recompute_policy{Recompute::kAuto};

void set_recompute(const std::string& policy) {
  TORCH_CHECK_VALUE(policy == "auto" || policy == "rule" || policy == "all" || policy == "keep",
                    "vggbench::_set_recompute: the policy must be auto, rule, all or keep, got '", policy,
                    "'");
  recompute_policy.store(policy == "rule"   ? Recompute::kRule
                         : policy == "all"  ? Recompute::kAll
                         : policy == "keep" ? Recompute::kKeep
                                            : Recompute::kAuto);
}

bool recompute_all(const at::Device& device) {
  const Recompute policy = recompute_policy.load();
  return policy == Recompute::kAll || (policy != Recompute::kRule && !device.is_cpu());
}

// Whether a training-mode BN forward keeps z. "auto" does for bfloat16 on the CPU: there the
// rule flags channels whose |beta / gamma| (or residual) is large against |mean| / std, as
// bfloat16's rounding of the output makes recovery less accurate than native's rounding of z
// (VGG38 BN+RC under bf16 autocast, batch 100, from its initial state: 13 of 37 units), and
// each recompute costs a conv; keeping z (2 bytes a value, as native's saved BN input) made
// the 32->32 unit's fwd+bwd (N=100, 32x32, the benchmark's BN state) 0.8x native bfloat16's
// time instead of 1.0x. And for a conv of fewer than kKeepBelowChannels input channels on
// the CPU (the 3-channel entry conv), whose output has as many values as 32->32 units' but
// costs far less: there the recovery's float64 arithmetic in the backward's two passes is a
// large share of the unit (keeping z: the float32 entry unit's fwd+bwd, N=100, 0.87x as long
// at 32x32, 0.82x at 16x16, 0.85x at 8x8 on an AMD EPYC Zen 3 with AVX2, same process; one
// more activation saved, 13 MB at 32x32: for VGG38 BN+RC, 1 of its 37 units).
constexpr int64_t kKeepBelowChannels = 8;
bool keeps_conv_output(const Tensor& input) {
  const Recompute policy = recompute_policy.load();
  const bool few_channels = input.dim() == 4 && input.size(1) < kKeepBelowChannels;
  return policy == Recompute::kKeep || (policy == Recompute::kAuto && input.is_cpu() &&
                                        (input.scalar_type() == at::kBFloat16 || few_channels));
}

// conv_bn_act's tensor arguments, in schema order, and which of them _conv_bn_act_backward
// returns gradients for (input, weight, bias, bn_weight, bn_bias, residual).
constexpr int kTensorArgs = 8;
constexpr int kArgs = 13;
constexpr std::array<int, 6> kGradArgs = {0, 1, 2, 3, 4, 7};

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

struct ConvBnAct : torch::autograd::Function<ConvBnAct> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const OptTensor& bias, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& residual,
                               int64_t stride, int64_t padding, bool use_batch_stats, double eps,
                               double negative_slope) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("vggbench::conv_bn_act", "")
                               .typed<std::tuple<Tensor, Tensor, Tensor>(
                                   const Tensor&, const Tensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, int64_t, int64_t, bool,
                                   double, double)>();
    static const auto conv_stats = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("vggbench::_conv_stats", "")
                                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                                           const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t)>();
    static const auto bn_act = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("vggbench::_bn_act", "")
                                   .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const OptTensor&, const OptTensor&, double,
                                                 double)>();
    const bool keep = present(bn_weight) && use_batch_stats && keeps_conv_output(input);
    Tensor kept_z;  // undefined unless kept
    auto [out, mean, var] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (!keep) {
        return op.call(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                       stride, padding, use_batch_stats, eps, negative_slope);
      }
      checks::conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                          stride, padding, use_batch_stats, eps, negative_slope);
      auto [z, batch_mean, batch_var] = conv_stats.call(input, weight, bias, stride, padding);
      kept_z = z;
      return std::tuple{bn_act.call(z, batch_mean, batch_var, *bn_weight, *bn_bias, bias, residual, eps,
                                    negative_slope),
                        batch_mean, batch_var};
    }();
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for mean and var
    const bool running = present(bn_weight) && !use_batch_stats;  // eval: the running stats
    const auto tensor = [](const OptTensor& t) { return t.value_or(Tensor()); };
    // Nothing else activation-sized but a kept z: the residual is another layer's input or output.
    ctx->save_for_backward({out, input, weight, tensor(bias), tensor(bn_weight), tensor(bn_bias),
                            tensor(residual), running ? tensor(running_mean) : mean,
                            running ? tensor(running_var) : var, kept_z});
    // Autograd gives each present tensor argument an edge: a bit per argument that was.
    int64_t edges = 0b11;  // input and weight
    int bit = 2;
    for (const OptTensor* t : {&bias, &bn_weight, &bn_bias, &running_mean, &running_var, &residual}) {
      edges |= int64_t{present(*t)} << bit++;
    }
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["use_batch_stats"] = use_batch_stats;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["negative_slope"] = negative_slope;
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("vggbench::_conv_bn_act_backward", "")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                const Tensor&, int64_t, int64_t, bool, double, double, bool, std::array<bool, 6>,
                const OptTensor&, const OptTensor&, const OptTensor&)>();
    variable_list result(kArgs);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // the output did not reach the loss
    // The backward op has no derivative: under create_graph, gradients whose own backward
    // raises (Python's @once_differentiable) instead of silently wrong second derivatives.
    const bool create_graph = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &out = saved[0], &input = saved[1];
    const auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const auto stats = stats_dtype(input.scalar_type());  // eval: running stats of any dtype
    const int64_t edges = ctx->saved_data["edges"].toInt();
    std::array<bool, 6> mask{};
    for (int arg = 0, edge = 0, grad = 0; arg < kTensorArgs; ++arg) {
      const bool has_edge = edges >> arg & 1;
      if (grad < 6 && kGradArgs[grad] == arg) mask[grad++] = has_edge && ctx->needs_input_grad(edge);
      edge += has_edge;
    }
    const auto computed = op.call(
        grad_out, out, input, saved[2], optional(saved[3]), optional(saved[4]), optional(saved[5]),
        optional(saved[6]), saved[7].to(stats), saved[8].to(stats),
        ctx->saved_data["stride"].toInt(), ctx->saved_data["padding"].toInt(),
        ctx->saved_data["use_batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["negative_slope"].toDouble(), recompute_all(out.device()), mask,
        std::nullopt, std::nullopt, optional(saved[9]));
    const std::array<Tensor, 6> gradients = {std::get<0>(computed), std::get<1>(computed),
                                             std::get<2>(computed), std::get<3>(computed),
                                             std::get<4>(computed), std::get<5>(computed)};
    for (size_t i = 0; i < kGradArgs.size(); ++i) {
      if (!mask[i]) continue;
      result[kGradArgs[i]] = create_graph ? gradients[i].detach().requires_grad_() : gradients[i];
    }
    if (!create_graph) return result;
    return torch::autograd::DelayedError(
               "vggbench::conv_bn_act has no double backward (its backward is not differentiable)",
               kArgs)
        .apply(std::move(result));
  }
};

std::tuple<Tensor, Tensor, Tensor> conv_bn_act_autograd(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& residual, int64_t stride, int64_t padding, bool use_batch_stats, double eps,
    double negative_slope) {
  const variable_list outputs =
      ConvBnAct::apply(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                       residual, stride, padding, use_batch_stats, eps, negative_slope);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace
}  // namespace vggbench

TORCH_LIBRARY_FRAGMENT(vggbench, m) {
  // The backward policy: "auto", "rule" or "all" (above; vggbench/ops.py's RECOMPUTE sets it).
  m.def("_set_recompute(str policy) -> ()", &vggbench::set_recompute);
}

TORCH_LIBRARY_IMPL(vggbench, Autograd, m) {
  m.impl("conv_bn_act", &vggbench::conv_bn_act_autograd);
}
