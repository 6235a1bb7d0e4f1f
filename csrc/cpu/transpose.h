// Layout copies of 4-D activations between contiguous (NCHW) and channels_last (NHWC), for
// the CPU's own convs, which read and write channels_last only. ATen's copy walks the
// destination in order, reading one value per cache line of the source, and when H * W *
// element size is a multiple of 4 KB the lines of every channel compete for the same L1 set:
// N=100, C=32, 32x32 float32 to channels_last took 4.9 ms against 1.6 ms the other way (AMD
// EPYC Zen 3, 2 threads). These copies move 8x8 blocks through registers (AVX2 for float32,
// SSE2 for bfloat16): 1.6-2.2 ms both ways there.
#pragma once

#include <ATen/core/Tensor.h>

namespace vggbench::cpu {

// A channels_last copy of t, a contiguous 4-D tensor.
at::Tensor channels_last_copy(const at::Tensor& t);

// A contiguous copy of t, a channels_last 4-D tensor.
at::Tensor contiguous_copy(const at::Tensor& t);

}  // namespace vggbench::cpu
