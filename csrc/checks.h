// Every argument check of the vggbench ops (ops.cpp lists them), in one place: each op
// entry point calls its function here first, so a kernel only ever sees tensors on the
// input's device, of the dtypes and lengths it expects.
#pragma once

#include "fused_unit.h"

namespace vggbench::checks {

void conv_bn_act(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                 const OptTensor& bn_weight, const OptTensor& bn_bias,
                 const OptTensor& running_mean, const OptTensor& running_var,
                 const OptTensor& residual, int64_t stride, int64_t padding, bool use_batch_stats,
                 double eps, double slope);

void conv_stats(const Tensor& input, const Tensor& weight, const OptTensor& bias, int64_t stride,
                int64_t padding);

void bn_act(const Tensor& z, const Tensor& mean, const Tensor& var, const Tensor& bn_weight,
            const Tensor& bn_bias, const OptTensor& bias, const OptTensor& residual, double eps,
            double slope);

// The backward ops (_conv_bn_act_backward, and _conv_bn_act_backward_sums with
// use_batch_stats and no sums).
void backward(const Tensor& grad_out, const Tensor& out, const Tensor& input, const Tensor& weight,
              const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
              const OptTensor& residual, const Tensor& mean, const Tensor& var, int64_t stride,
              int64_t padding, bool use_batch_stats, double eps, double slope,
              const OptTensor& local_sums, const OptTensor& reduced_sums, const OptTensor& kept_z);

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& batch_mean,
                          const Tensor& batch_var, const OptTensor& count, int64_t batch_count,
                          std::optional<double> momentum);

}  // namespace vggbench::checks
