// Index tensors this library made -- patch_indices' rows, sample_gather's sel -- are in range and
// unique by construction. The CUDA ops that take them validate their indices on the device and read
// the verdict back, so that a bad row gets an error naming it: a host synchronisation per op, two or
// three per dynamic block, each leaving the GPU idle while the host launches what follows. Handed a
// tensor made here and unchanged since, they can skip that read (cuda/patch_grid.cuh,
// cuda/sample_table.cuh; with the experimental switch on, not yet run on a GPU).
//
// "Unchanged" is PyTorch's own notion: the very TensorImpl the op returned, still alive (a weak
// reference, so a new tensor at a recycled address is not mistaken for it), with the version counter
// it had then (an in-place write bumps it). A view, a copy or a moved tensor is another object and is
// validated as usual. A write that bypasses the version counter (raw pointers, DLPack) is not seen,
// as it is not by PyTorch's autograd checks either. Tensors made under torch.inference_mode have no
// version counter, so they are never known (their writes could not be seen).
#include "known_indices.h"

#include <c10/core/TensorImpl.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <array>
#include <mutex>

namespace laudnet_ops {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  int64_t version = 0;
  std::vector<int64_t> extent;
};

// The most recent tensors only: a network's forward makes one or two per block, and each is used
// right after it is made.
constexpr size_t kEntries = 64;

struct Registry {
  std::mutex mutex;
  std::array<Entry, kEntries> entries;
  size_t next = 0;
};

Registry& registry() {
  static Registry r;
  return r;
}

bool fits(const std::vector<int64_t>& made_for, c10::IntArrayRef extent) {
  if (made_for.size() != extent.size()) return false;
  for (size_t d = 0; d < extent.size(); ++d) {
    if (made_for[d] > extent[d]) return false;
  }
  return true;
}

}  // namespace

void remember_indices(const at::Tensor& t, std::vector<int64_t> extent) {
  if (!t.defined() || t.is_inference()) return;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  Entry& e = r.entries[r.next];
  r.next = (r.next + 1) % kEntries;
  e.impl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr());
  e.version = t._version();
  e.extent = std::move(extent);
}

bool known_indices(const at::Tensor& t, c10::IntArrayRef extent) {
  if (!t.defined() || t.is_inference()) return false;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  for (const Entry& e : r.entries) {
    const auto alive = e.impl.lock();
    if (alive.get() != t.unsafeGetTensorImpl()) continue;
    return e.version == t._version() && fits(e.extent, extent);
  }
  return false;
}

namespace {

// For tests: whether t counts as known for a grid of `extent`.
bool known_indices_op(const at::Tensor& t, c10::IntArrayRef extent) { return known_indices(t, extent); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def("_known_indices(Tensor t, int[] extent) -> bool");
}

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) { m.impl("_known_indices", &known_indices_op); }

}  // namespace laudnet_ops
