// Schema of patch_indices: the batched index bookkeeping every sparse kernel consumes.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // mask: bool (N, Hp, Wp) -> int32 (P, 3), rows (n, py, px) in row-major order.
  m.def("patch_indices(Tensor mask) -> Tensor");
}
