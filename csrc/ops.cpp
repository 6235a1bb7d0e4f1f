// The vggbench ops: what they compute, as registered with PyTorch (torch.ops.vggbench.*).
// Read this first. Then: checks.cpp (every argument check), autograd.cpp (conv_bn_act's
// autograd, and the backward policy), fused_unit.cpp (the shared orchestration: which backend
// passes run around the conv, the backward's control flow), and the backends
// (cpu/fused_unit_kernel.cpp, cuda/fused_unit_kernel.cu) whose per-element and per-channel maths
// live in fused_unit_math.h. vggbench/ops.py adds the fake (meta) implementations.
//
// Ops whose names start with an underscore are internal: the backward, and the halves
// synchronised BatchNorm (vggbench/models/sync_fused.py) runs with collectives between.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vggbench._C` loads this library, which runs the registrations below; the
// module itself is empty (the ops live in torch.ops.vggbench).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vggbench, m) {
  // out = leaky_relu(bn(conv2d(input, weight, bias)) + residual, negative_slope), and with
  // use_batch_stats the batch's per-channel mean and biased variance that normalised it, in
  // float32 (float64 for float64 inputs); otherwise (running statistics, or no BN) those two
  // are empty. An empty batch gives mean 0 and variance 0.
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, Tensor? residual, "
      "int stride, int padding, bool use_batch_stats, float eps, float negative_slope)"
      " -> (Tensor, Tensor, Tensor)");
  // nn.BatchNorm2d's running-statistics update from one batch's mean and biased variance
  // over `count` values per channel (a 0-d tensor of their dtype, so that a distributed
  // count needs no host read) or, when count is None, `batch_count` values:
  // num_batches_tracked += 1; unless the count is 0, running = (1 - f) * running +
  // f * batch with f = momentum, or 1 / num_batches_tracked when momentum is None;
  // running_var takes the unbiased variance.
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor batch_mean, Tensor batch_var, Tensor? count, "
      "float? momentum, int batch_count=-1) -> ()");
  // conv_bn_act's gradients for (input, weight, bias, bn_weight, bn_bias, residual); an
  // entry whose mask is False or whose input is absent comes back empty. mean and var: the
  // forward's batch statistics, or with use_batch_stats False the running ones (empty
  // without BN). recompute_all:
  // recompute the normalised conv output instead of recovering it from `out` (no host
  // read: the policy for CUDA graphs). local_sums / reduced_sums: this rank's and all
  // ranks' _conv_bn_act_backward_sums (synchronised BN): the input gradient uses the
  // reduced sums, the BN parameters' gradients the local ones, and no reduction runs.
  // kept_z: the forward's conv output without its bias (_conv_stats' z), kept for training-
  // mode BN: xhat comes from it, neither recovered nor recomputed.
  m.def(
      "_conv_bn_act_backward(Tensor grad_out, Tensor out, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, Tensor mean, "
      "Tensor var, int stride, int padding, bool use_batch_stats, float eps, "
      "float negative_slope, bool recompute_all, bool[6] output_mask, "
      "Tensor? local_sums=None, Tensor? reduced_sums=None, Tensor? kept_z=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training-mode conv_bn_act in halves, for synchronised BN, computing exactly what it
  // does: the conv output without its bias, and the per-channel mean (bias included) and
  // biased variance (0 and 0 for an empty batch) ...
  m.def("_conv_stats(Tensor input, Tensor weight, Tensor? bias, int stride, int padding)"
        " -> (Tensor, Tensor, Tensor)");
  // ... the normalisation of z + bias with given (merged) statistics, + residual, and
  // activation ...
  m.def("_bn_act(Tensor z, Tensor mean, Tensor var, Tensor bn_weight, Tensor bn_bias, "
        "Tensor? bias, Tensor? residual, float eps, float negative_slope) -> Tensor");
  // ... and the backward's per-channel sums over this call's batch, (2C + 2,):
  // [sum(g) (C), sum(g * xhat) (C), count, recomputed (1 when xhat was recomputed)].
  // The first 2C + 1 entries summed over ranks are the reduced_sums of the backward.
  m.def(
      "_conv_bn_act_backward_sums(Tensor grad_out, Tensor out, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor bn_weight, Tensor bn_bias, Tensor? residual, Tensor mean, "
      "Tensor var, int stride, int padding, float eps, float negative_slope, "
      "bool recompute_all) -> Tensor");
}
