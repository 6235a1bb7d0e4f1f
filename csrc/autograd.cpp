// conv_bn_act's autograd, in C++ so that a call runs no Python on its way to the kernels (the
// Python autograd.Function of torch.library.register_autograd cost ~0.1 ms per forward and
// backward: as much as the op's own forward on the study's 8x8 maps).
// The forward redispatches to the backend below autograd and saves only its output, its
// input, the parameters and the statistics that normalised (the running ones in eval: an
// in-place update before backward is caught by autograd's version check, as with native
// BatchNorm); the backward is the _conv_bn_act_backward op, called through the dispatcher.
//
// The backward policy (vggbench/ops.py's RECOMPUTE, set through _set_recompute) is read when
// the backward runs: "rule" recovers xhat where the recovery rule allows, "all" always
// recomputes it (no host read: CUDA graphs), "auto" is "rule" on the CPU and "all" elsewhere.
//
// The only file with the autograd headers (they are heavy to compile).
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

enum class Recompute { kAuto, kRule, kAll };
std::atomic<Recompute> recompute_policy{Recompute::kAuto};

void set_recompute(const std::string& policy) {
  TORCH_CHECK_VALUE(policy == "auto" || policy == "rule" || policy == "all",
                    "vggbench::_set_recompute: the policy must be auto, rule or all, got '", policy,
                    "'");
  recompute_policy.store(policy == "rule" ? Recompute::kRule
                         : policy == "all" ? Recompute::kAll
                                           : Recompute::kAuto);
}

bool recompute_all(const at::Device& device) {
  const Recompute policy = recompute_policy.load();
  return policy == Recompute::kAll || (policy == Recompute::kAuto && !device.is_cpu());
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
    auto [out, mean, var] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                     stride, padding, use_batch_stats, eps, negative_slope);
    }();
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for mean and var
    const bool running = present(bn_weight) && !use_batch_stats;  // eval: the running stats
    const auto tensor = [](const OptTensor& t) { return t.value_or(Tensor()); };
    // Nothing else activation-sized: the residual is another layer's input or output.
    ctx->save_for_backward({out, input, weight, tensor(bias), tensor(bn_weight), tensor(bn_bias),
                            tensor(residual), running ? tensor(running_mean) : mean,
                            running ? tensor(running_var) : var});
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
                const OptTensor&, const OptTensor&)>();
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
        std::nullopt, std::nullopt);
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
