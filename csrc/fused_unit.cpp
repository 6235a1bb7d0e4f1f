// The orchestration every backend shares (the schemas are in ops.cpp, the checks in
// checks.cpp): which backend passes run around the conv, and the backward's control flow.
// The conv and the passes, with their per-channel maths, come from the backend's Kernels
// (cpu/, cuda/); around them this file dispatches no op that computes, so a training unit
// with BN and a residual costs (fused_unit.h): forward = conv + batch_stats + normalize_act
// (the conv and batch_stats one pass where the backend has conv_stats; + update_running_stats_,
// called by vggbench/ops.py); backward = backward_reduce +
// backward_apply + the conv's backward (or backward_reduce + apply_weight_grad, where the
// backend has it and only the weight's gradient is wanted); eval = conv + normalize_act. The conv runs without
// its bias: the bias enters the normalisation's shift (and the batch mean).
//
// Forward saves nothing activation-sized besides its input and output: backward recovers
// the normalised conv output from the output, or recomputes it with the conv when the
// recovery rule (fused_unit_math.h) says recovery would lose accuracy, or always under
// recompute_all (no host read at all: the policy for CUDA graphs).
//
// Host reads: none in the forward or the running-statistics update. The backward's rule
// decides per channel in the backend's reduction; the host then needs one bit (recompute
// or not) to launch the conv. Reading it costs nothing on the CPU (the flags are in host
// memory, read directly, no op dispatched); on CUDA it is one small blocking copy, which
// recompute_all avoids (vggbench/ops.py's default policy on CUDA).
#include "checks.h"
#include "cpu/reusable_buffer.h"
#include "fused_unit.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tensor.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <array>
#include <vector>

namespace vggbench {

Geometry geometry_of(const Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  if (t.is_contiguous()) return {n, c, hw};
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast));
  return {n * hw, c, 1};
}

namespace {
bool channels_last(const Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}
}  // namespace

at::MemoryFormat memory_format_of(const Tensor& input, const Tensor& weight) {
  return channels_last(input) || channels_last(weight) ? at::MemoryFormat::ChannelsLast
                                                       : at::MemoryFormat::Contiguous;
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

// A per-channel tensor as the kernels read it: contiguous, in the statistics dtype (no copy
// when it already is).
Tensor as_stats(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

Tensor no_stats(const Tensor& like) { return at::empty({0}, like.options().dtype(stats_dtype(like.scalar_type()))); }

// The conv bias as the kernels read it: contiguous, in its own (the activation) dtype.
OptTensor contiguous(const OptTensor& bias) { return bias ? OptTensor(bias->contiguous()) : std::nullopt; }

// BatchNorm's normalisation with the given statistics (batch or running), the conv bias
// folded into its shift.
ChannelAffine batch_norm_affine(const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean,
                                const Tensor& var, const OptTensor& bias, double eps) {
  const auto stats = mean.scalar_type();
  return {true, as_stats(bn_weight, stats), as_stats(bn_bias, stats), as_stats(mean, stats),
          as_stats(var, stats), contiguous(bias), eps};
}

// Eval-mode BatchNorm folded into the conv, for the eval backward's chain rule:
// W' = W * s, b' = beta + (b - mean) * s, s = gamma / sqrt(var + eps). Returns (W', b', s).
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

// The backend's conv without bias and its backward, each one profiler scope (whatever
// layout copies the backend makes belong to it), with results in the call's layout `fmt`.
Tensor conv(const Kernels& k, const Tensor& input, const Tensor& weight, int64_t stride,
            int64_t padding, at::MemoryFormat fmt) {
  RECORD_FUNCTION("vggbench::conv", {});
  return k.conv(input.contiguous(fmt), weight, std::nullopt, stride, padding).contiguous(fmt);
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Kernels& k, const Tensor& grad_z, const Tensor& x,
                                                 const Tensor& weight, bool has_bias, int64_t stride,
                                                 int64_t padding, std::array<bool, 3> mask,
                                                 at::MemoryFormat fmt) {
  RECORD_FUNCTION("vggbench::conv_backward", {});
  auto [grad_x, grad_w, grad_b] = k.conv_backward(grad_z, x, weight, has_bias, stride, padding, mask);
  return {grad_x.defined() ? grad_x.contiguous(fmt) : grad_x, grad_w.defined() ? grad_w.contiguous(fmt) : grad_w,
          grad_b};
}

// Training-mode BN's first half: the conv without its bias, and the per-channel mean (bias
// included) and biased variance. A distributed caller merges the ranks' statistics before
// the second half (_bn_act: normalize_act with them).
std::tuple<Tensor, Tensor, Tensor> conv_stats(const Kernels& k, const Tensor& input,
                                              const Tensor& weight, const OptTensor& bias,
                                              int64_t stride, int64_t padding) {
  const auto fmt = memory_format_of(input, weight);
  if (k.conv_stats) {  // (its own "vggbench::conv" profiler scope)
    if (auto fused = k.conv_stats(input.contiguous(fmt), weight, contiguous(bias), stride, padding)) {
      return *fused;
    }
  }
  const Tensor z = conv(k, input, weight, stride, padding, fmt);
  auto [mean, var] = k.batch_stats(z, contiguous(bias));
  return {z, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> forward(
    const Kernels& k, const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& residual, int64_t stride, int64_t padding,
    bool use_batch_stats, double eps, double slope) {
  checks::conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      residual, stride, padding, use_batch_stats, eps, slope);
  const auto fmt = memory_format_of(input, weight);
  const OptTensor res = residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt;
  if (bn_weight && use_batch_stats) {  // z is ours: normalised in place
    auto [z, mean, var] = conv_stats(k, input, weight, bias, stride, padding);
    k.normalize_act(z, batch_norm_affine(*bn_weight, *bn_bias, mean, var, bias, eps), res, slope, z);
    return {z, mean, var};
  }
  // without BN: the bias alone; eval: the running statistics (backward reads them from
  // ops.py), in the statistics dtype (bfloat16 activations may come with bfloat16 buffers: a
  // model moved with .to(bfloat16)). The normalisation adds the conv's bias.
  const auto stats = stats_dtype(input.scalar_type());
  const ChannelAffine affine = bn_weight ? batch_norm_affine(*bn_weight, *bn_bias, as_stats(*running_mean, stats),
                                                             as_stats(*running_var, stats), bias, eps)
                                         : ChannelAffine{false, {}, {}, {}, {}, contiguous(bias), eps};
  if (k.conv_act && !res) {
    if (auto out = k.conv_act(input.contiguous(fmt), weight, stride, padding, affine, slope)) {
      return {*out, no_stats(*out), no_stats(*out)};
    }
  }
  const Tensor z = conv(k, input, weight, stride, padding, fmt);
  k.normalize_act(z, affine, res, slope, z);
  return {z, no_stats(z), no_stats(z)};
}

// The entries set in a per-channel flag vector: read from host memory (no op dispatched,
// nothing waited for on the CPU); a device tensor is copied first.
std::vector<int64_t> set_flags(const Tensor& flags) {
  const Tensor host = flags.is_cpu() ? flags : flags.to(at::kCPU);
  std::vector<int64_t> set;
  AT_DISPATCH_FLOATING_TYPES(host.scalar_type(), "vggbench_set_flags", [&] {
    const scalar_t* data = host.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < host.numel(); ++c) {
      if (data[c] != scalar_t(0)) set.push_back(c);
    }
  });
  return set;
}

Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

Tensor grad_or_empty(bool wanted, const Tensor& grad, const Tensor& like, at::MemoryFormat fmt) {
  return wanted ? grad.to(like.scalar_type()).contiguous(like.dim() == 4 ? fmt : at::MemoryFormat::Contiguous)
                : empty_grad(like);
}

// The backward passes' inputs; with training-mode BN (`bn_weight` given) its per-channel
// operands too.
BackwardInputs backward_inputs(const Tensor& grad_out, const Tensor& out, const OptTensor& residual,
                               at::MemoryFormat fmt, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const Tensor& mean, const Tensor& var,
                               double eps, double slope) {
  const auto stats = mean.scalar_type();
  return {grad_out.contiguous(fmt), out.contiguous(fmt),
          residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt, std::nullopt, std::nullopt,
          bn_weight ? as_stats(*bn_weight, stats) : Tensor(), bn_bias ? as_stats(*bn_bias, stats) : Tensor(),
          bn_weight ? as_stats(mean, stats) : Tensor(), bn_weight ? as_stats(var, stats) : Tensor(), eps, slope};
}

// Training-mode BN backward's recompute of xhat = (conv(x) + bias - mean) / sqrt(var + eps):
// the conv, normalised (Kernels::reads_xhat_affine, below); for every channel, or (some) only
// for those the rule flagged, the others recovered.
struct Recompute {
  const Kernels& k;
  const Tensor& x;
  const Tensor& weight;
  const OptTensor& bias;
  int64_t stride, padding;
  at::MemoryFormat fmt;

  void operator()(BackwardInputs& in) const {
    RECORD_FUNCTION("vggbench::recompute_xhat", {});  // so profiles count the recomputes
    normalised(in, conv(k, x, weight, stride, padding, fmt), /*owned=*/true);
  }

  // xhat from the conv output without its bias, z (in the call's layout): normalised in the
  // backward passes' registers where the backend can, else by the normalise pass with slope 1
  // (the identity), in place when z is `owned`, else into a new tensor.
  void normalised(BackwardInputs& in, const Tensor& z, bool owned) const {
    const ChannelAffine xhat{true, {}, {}, in.mean, in.var, contiguous(bias), in.eps};
    if (k.reads_xhat_affine) {
      in.xhat_affine = xhat;
      in.xhat = z;
      return;
    }
    const Tensor normalised_z = owned ? z : at::empty_like(z);
    k.normalize_act(z, xhat, std::nullopt, 1.0, normalised_z);
    in.xhat = normalised_z;
  }

  // The channels to recompute when the rule flags `flagged`: those, and where the conv has a
  // multiple of 8 channels, the next unflagged ones up to a multiple of 8, so that their conv
  // takes the forward's path (the CPU's Winograd kernels need it) and gives its bits.
  std::vector<int64_t> channels_for(const std::vector<int64_t>& flagged) const {
    const int64_t all = weight.size(0);
    std::vector<bool> chosen(all, false);
    for (const int64_t c : flagged) chosen[c] = true;
    auto count = static_cast<int64_t>(flagged.size());
    for (int64_t c = 0; all % 8 == 0 && count % 8 != 0 && c < all; ++c) {
      if (!chosen[c]) chosen[c] = true, ++count;
    }
    std::vector<int64_t> channels;
    for (int64_t c = 0; c < all; ++c) {
      if (chosen[c]) channels.push_back(c);
    }
    return channels;
  }

  // Whether recomputing only `channels` pays and keeps the numerics: the backend recovers
  // xhat into a tensor, which holds exactly the value the passes recover in registers only
  // when it is of the compute type (float and double activations, not bfloat16), and a
  // conv over a quarter of the channels or more costs about the whole one.
  bool pays(const BackwardInputs& in, size_t channels) const {
    const auto dtype = in.out.scalar_type();
    return k.recover_xhat != nullptr && (dtype == at::kFloat || dtype == at::kDouble) &&
           4 * static_cast<int64_t>(channels) <= weight.size(0);
  }

  void some(BackwardInputs& in, const std::vector<int64_t>& channels) const {
    RECORD_FUNCTION("vggbench::recompute_xhat", {});
    Tensor xhat = at::empty_like(in.out);
    k.recover_xhat(in, xhat);
    const Tensor index = at::tensor(channels, at::TensorOptions().dtype(at::kLong)).to(x.device());
    const Tensor z = conv(k, x, weight.index_select(0, index), stride, padding, fmt);
    const OptTensor b = bias ? OptTensor(bias->index_select(0, index)) : std::nullopt;
    const ChannelAffine affine{true, {}, {}, in.mean.index_select(0, index), in.var.index_select(0, index), b,
                               in.eps};
    k.normalize_act(z, affine, std::nullopt, 1.0, z);
    xhat.index_copy_(1, index, z);
    in.xhat = xhat;
  }
};

// sum(g) and sum(g * xhat) over this call's batch, and whether xhat was recomputed (then
// set in in.xhat). One reduction pass when xhat is recovered; with recompute_all (or
// slope 0, which loses the negative branch) the conv runs first; otherwise when the rule
// flags a channel, the conv (over the flagged channels only, when `partial` and it pays)
// and a second reduction follow.
std::tuple<Tensor, Tensor, bool> bn_backward_sums(const Kernels& k, const Recompute& recompute,
                                                  BackwardInputs& in, bool recompute_all, bool partial) {
  Tensor sum_g, sum_gx, flags;
  if (!recompute_all && in.slope != 0) {
    std::tie(sum_g, sum_gx, flags) = k.backward_reduce(in);
    const std::vector<int64_t> flagged = set_flags(flags);
    if (flagged.empty()) return {sum_g, sum_gx, false};
    const std::vector<int64_t> channels = recompute.channels_for(flagged);
    if (partial && recompute.pays(in, channels.size())) {
      recompute.some(in, channels);
    } else {
      recompute(in);
    }
  } else {
    recompute(in);
  }
  std::tie(sum_g, sum_gx, flags) = k.backward_reduce(in);
  return {sum_g, sum_gx, true};
}

// Host read of the `recomputed` entry of _conv_bn_act_backward_sums (free on the CPU).
bool recomputed_in(const Tensor& local_sums) {
  return !set_flags(local_sums.narrow(0, local_sums.size(0) - 1, 1)).empty();
}

Grads backward(const Kernels& k, const Tensor& grad_out, const Tensor& out, const Tensor& input,
               const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
               const OptTensor& bn_bias, const OptTensor& residual, const Tensor& mean,
               const Tensor& var, int64_t stride, int64_t padding, bool use_batch_stats,
               double eps, double slope, bool recompute_all, std::array<bool, 6> mask,
               const OptTensor& local_sums, const OptTensor& reduced_sums, const OptTensor& kept_z) {
  checks::backward(grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
                   stride, padding, use_batch_stats, eps, slope, local_sums, reduced_sums, kept_z);
  const auto fmt = memory_format_of(input, weight);
  const auto stats = mean.scalar_type();
  const Tensor x = input.contiguous(fmt);
  const bool batch_norm = bn_weight.has_value();
  const bool train_bn = batch_norm && use_batch_stats;
  BackwardInputs in = backward_inputs(grad_out, out, residual, fmt, train_bn ? bn_weight : std::nullopt,
                                      bn_bias, mean, var, eps, slope);
  const int64_t channels = weight.size(0);
  Tensor grad_z = cpu::reusable_like(in.out);  // internal: its memory outlives the call on the CPU
  OptTensor grad_residual;
  if (residual && mask[5]) grad_residual = at::empty_like(in.out);
  Tensor grad_gamma, grad_beta;
  OptTensor direct_grad_w;  // the weight gradient, where apply_weight_grad computes it

  if (train_bn) {
    const Recompute recompute{k, x, weight, bias, stride, padding, fmt};
    Tensor sum_g, sum_gx;
    OptTensor count;
    if (local_sums) {  // synchronised BN: the sums op ran the reduction
      grad_beta = local_sums->narrow(0, 0, channels).clone();  // outputs must not alias inputs
      grad_gamma = local_sums->narrow(0, channels, channels).clone();
      if (recompute_all || recomputed_in(*local_sums)) recompute(in);
      sum_g = reduced_sums->narrow(0, 0, channels);
      sum_gx = reduced_sums->narrow(0, channels, channels);
      count = reduced_sums->select(0, 2 * channels);
    } else if (kept_z) {  // xhat from the forward's conv output: no rule, no recompute
      recompute.normalised(in, kept_z->contiguous(fmt), /*owned=*/false);
      std::tie(grad_beta, grad_gamma, std::ignore) = k.backward_reduce(in);
      sum_g = grad_beta, sum_gx = grad_gamma;
    } else {
      std::tie(grad_beta, grad_gamma, std::ignore) =
          bn_backward_sums(k, recompute, in, recompute_all, /*partial=*/true);
      sum_g = grad_beta, sum_gx = grad_gamma;
    }
    // only the weight's gradient needs grad_z (the bias's is 0, below): the backend may
    // reduce it without storing it
    const bool weight_only = mask[1] && !mask[0] && !grad_residual;
    if (weight_only && k.apply_weight_grad) {
      direct_grad_w = k.apply_weight_grad(in, sum_g, sum_gx, count, x, weight, stride, padding);
    }
    if (!direct_grad_w) k.backward_apply(in, sum_g, sum_gx, count, grad_z, grad_residual);
  } else {
    k.backward_apply(in, std::nullopt, std::nullopt, std::nullopt, grad_z, grad_residual);
  }

  Tensor conv_weight = weight;
  OptTensor conv_bias = bias;
  Tensor fold_scale;
  const bool eval_bn = batch_norm && !use_batch_stats;
  if (eval_bn) {
    std::tie(conv_weight, conv_bias, fold_scale) =
        fold_bn(weight, bias, *bn_weight, *bn_bias, mean, var, eps);
  }
  const bool want_bias = bias && mask[2];
  const bool want_bn = batch_norm && (mask[3] || mask[4]);
  // BN with batch statistics subtracts the conv's bias again with the mean: the output does
  // not depend on it, and its gradient is exactly 0 (summing grad_z would give roundoff)
  const std::array<bool, 3> conv_mask{mask[0], mask[1] || (eval_bn && mask[3]),
                                      (want_bias && !train_bn) || (eval_bn && want_bn)};
  // the weight's gradient by apply_weight_grad's kernel wherever it applies: the same bits
  // whichever other gradients are wanted
  if (!direct_grad_w && conv_mask[1] && k.weight_grad) {
    direct_grad_w = k.weight_grad(grad_z, x, conv_weight, stride, padding);
  }
  Tensor grad_x, grad_w, grad_b;
  if (!direct_grad_w || conv_mask[0] || conv_mask[2]) {
    std::tie(grad_x, grad_w, grad_b) =
        conv_backward(k, grad_z, x, conv_weight, conv_bias.has_value(), stride, padding,
                      {conv_mask[0], conv_mask[1] && !direct_grad_w, conv_mask[2]}, fmt);
  }
  if (direct_grad_w) grad_w = *direct_grad_w;
  if (want_bias && train_bn) grad_b = at::zeros_like(*bias);

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
    return param ? grad_or_empty(wanted, grad, *param, fmt) : empty_grad(input);
  };
  return {grad_or_empty(mask[0], grad_x, input, fmt), grad_or_empty(mask[1], grad_w, weight, fmt),
          param_grad(want_bias, grad_b, bias), param_grad(batch_norm && mask[3], grad_gamma, bn_weight),
          param_grad(batch_norm && mask[4], grad_beta, bn_bias),
          param_grad(grad_residual.has_value(), grad_residual.value_or(Tensor()), residual)};
}

Tensor backward_sums(const Kernels& k, const Tensor& grad_out, const Tensor& out,
                     const Tensor& input, const Tensor& weight, const OptTensor& bias,
                     const Tensor& bn_weight, const Tensor& bn_bias, const OptTensor& residual,
                     const Tensor& mean, const Tensor& var, int64_t stride, int64_t padding,
                     double eps, double slope, bool recompute_all) {
  checks::backward(grad_out, out, input, weight, bias, bn_weight, bn_bias, residual, mean, var,
                   stride, padding, /*use_batch_stats=*/true, eps, slope, std::nullopt, std::nullopt,
                   std::nullopt);
  const auto fmt = memory_format_of(input, weight);
  const Tensor x = input.contiguous(fmt);
  BackwardInputs in = backward_inputs(grad_out, out, residual, fmt, bn_weight, bn_bias, mean, var, eps, slope);
  const Recompute recompute{k, x, weight, bias, stride, padding, fmt};
  // every channel recomputed, as _conv_bn_act_backward then does with these sums
  auto [sum_g, sum_gx, recomputed] = bn_backward_sums(k, recompute, in, recompute_all, /*partial=*/false);
  Tensor tail = at::full({2}, static_cast<double>(geometry_of(in.out).count()), mean.options());
  tail.narrow(0, 1, 1).fill_(recomputed ? 1.0 : 0.0);  // fills: no host-to-device copy
  return at::cat({sum_g, sum_gx, tail});
}

// nn.BatchNorm2d's running-statistics update (see ops.cpp): one backend pass, no host read.
void update_running_stats(const Kernels& k, const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& batch_mean,
                          const Tensor& batch_var, const OptTensor& count, int64_t batch_count,
                          std::optional<double> momentum) {
  checks::update_running_stats(running_mean, running_var, num_batches_tracked, batch_mean,
                               batch_var, count, batch_count, momentum);
  k.update_running_stats(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                         count, batch_count, momentum);
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
  m.impl("_conv_bn_act_backward",
         [k](const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
             const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
             const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
             int64_t padding, bool use_batch_stats, double eps, double negative_slope,
             bool recompute_all, std::array<bool, 6> output_mask, const OptTensor& local_sums,
             const OptTensor& reduced_sums, const OptTensor& kept_z) {
           return backward(*k, grad_out, out, input, weight, bias, bn_weight, bn_bias, residual,
                           mean, var, stride, padding, use_batch_stats, eps, negative_slope,
                           recompute_all, output_mask, local_sums, reduced_sums, kept_z);
         });
  m.impl("_conv_stats", [k](const Tensor& input, const Tensor& weight, const OptTensor& bias,
                            int64_t stride, int64_t padding) {
    checks::conv_stats(input, weight, bias, stride, padding);
    return conv_stats(*k, input, weight, bias, stride, padding);
  });
  m.impl("_bn_act", [k](const Tensor& z, const Tensor& mean, const Tensor& var,
                        const Tensor& bn_weight, const Tensor& bn_bias, const OptTensor& bias,
                        const OptTensor& residual, double eps, double negative_slope) {
    checks::bn_act(z, mean, var, bn_weight, bn_bias, bias, residual, eps, negative_slope);
    const auto fmt = memory_format_of(z, z);
    const OptTensor res = residual ? OptTensor(residual->contiguous(fmt)) : std::nullopt;
    Tensor out = at::empty_like(z, fmt);
    k->normalize_act(z.contiguous(fmt), batch_norm_affine(bn_weight, bn_bias, mean, var, bias, eps), res,
                     negative_slope, out);
    return out;
  });
  m.impl("_conv_bn_act_backward_sums",
         [k](const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
             const OptTensor& bias, const Tensor& bn_weight, const Tensor& bn_bias,
             const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
             int64_t padding, double eps, double negative_slope, bool recompute_all) {
           return backward_sums(*k, grad_out, out, input, weight, bias, bn_weight, bn_bias,
                                residual, mean, var, stride, padding, eps, negative_slope,
                                recompute_all);
         });
  m.impl("update_running_stats_",
         [k](const Tensor& running_mean, const Tensor& running_var, const Tensor& num_batches_tracked,
             const Tensor& batch_mean, const Tensor& batch_var, const OptTensor& count,
             std::optional<double> momentum, int64_t batch_count) {
           update_running_stats(*k, running_mean, running_var, num_batches_tracked, batch_mean,
                                batch_var, count, batch_count, momentum);
         });
}

}  // namespace vggbench
