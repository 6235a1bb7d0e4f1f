// Layout copies of 4-D activations between contiguous (NCHW) and channels_last (NHWC), for
// the CPU's own convs, which read and write channels_last only. ATen's copy walks the
// destination in order, reading one value per cache line of the source, and when H * W *
// element size is a multiple of 4 KB the lines of every channel compete for the same L1 set.
// These copies move 8x8 blocks through registers (AVX2 for float32, SSE2 for bfloat16). N=100,
// C=32, 2 threads, AMD EPYC Zen 3, medians, ATen's copy -> these: to channels_last 4.6-5.2 ->
// 1.5-1.7 ms at 32x32 float32, 2.4-3.0 -> 0.7-1.0 ms in bfloat16; back to NCHW 1.6-1.7 -> 2.0-2.1
// ms at 32x32 float32 (the one case measured slower), 1.3-1.4 -> 0.9-1.1 ms in bfloat16; at 16x16
// and 8x8, and with 64 or 128 channels, as fast or faster both ways. Tensors of fewer than 8
// channels or pixels take ATen's copy (value by value here, 3-channel images took 10x as long).
#pragma once

#include <ATen/core/Tensor.h>

namespace vggbench::cpu {

// A channels_last copy of t, a contiguous 4-D tensor.
at::Tensor channels_last_copy(const at::Tensor& t);

// A contiguous copy of t, a channels_last 4-D tensor.
at::Tensor contiguous_copy(const at::Tensor& t);

}  // namespace vggbench::cpu
