// A CPU buffer kept between calls for the backward's activation-sized temporary (grad_z).
#pragma once

#include <ATen/core/Tensor.h>

namespace vggbench::cpu {

// An uninitialised tensor of `like`'s sizes, strides and dtype in memory kept between
// calls. glibc gives large freed blocks back to the system (munmap, or trimming the heap),
// and a new tensor then faults its pages in afresh, one per 4 KB: a loop of 32->32 units
// (N=100, 32x32, float32) took ~2300 page faults per forward+backward with a fresh grad_z,
// ~600 with this one; training steps were 3.5-3.8% (VGG38 BN+RC) and 7.6% (VGG08) faster
// (batch 100, same-process A/B, 2-core AMD EPYC Zen 4). One buffer, the largest asked for so
// far, stays allocated; it is handed out while nothing else references its storage, so a
// call running at the same time on another thread gets a fresh tensor, as does a `like`
// that is not on the CPU or not non-overlapping and dense.
at::Tensor reusable_like(const at::Tensor& like);

}  // namespace vggbench::cpu
