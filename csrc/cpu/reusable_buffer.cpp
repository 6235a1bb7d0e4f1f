#include "reusable_buffer.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <mutex>

namespace vggbench::cpu {

at::Tensor reusable_like(const at::Tensor& like) {
  if (!like.is_cpu() || !like.is_non_overlapping_and_dense()) return at::empty_like(like);
  static std::mutex mutex;
  // bytes; never destroyed (a static tensor would be freed after the allocator at exit)
  static auto* const kept = new at::Tensor();
  const int64_t bytes = like.numel() * static_cast<int64_t>(like.element_size());
  const std::lock_guard<std::mutex> lock(mutex);
  if (kept->defined() && kept->storage().use_count() > 1) return at::empty_like(like);  // in use
  if (!kept->defined() || kept->numel() < bytes) {
    *kept = at::Tensor();  // the smaller buffer is freed before the larger is allocated
    *kept = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  // a view of the buffer's storage: it counts as in use until the view is gone
  return at::empty({0}, like.options()).set_(kept->storage(), 0, like.sizes(), like.strides());
}

}  // namespace vggbench::cpu
