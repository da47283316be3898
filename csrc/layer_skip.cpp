// Schemas of the layer-skipping ops: the samples whose block runs are gathered
// into a smaller batch, and the block's output is added back onto the residual
// of those samples only.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // gates: bool (N,) -> (x[sel], sel), sel int32 (K,) the indices of the samples whose gate is on.
  m.def("sample_gather(Tensor x, Tensor gates) -> (Tensor, Tensor)");
  // out = act(residual); out[sel] = act(residual[sel] + y); sel unique and in range.
  m.def("sample_scatter_add(Tensor residual, Tensor y, Tensor sel, str activation=\"relu\") -> Tensor");
  m.def("sample_scatter_add_(Tensor(a!) residual, Tensor y, Tensor sel, str activation=\"relu\") -> ()");
  // x[sel] for any in-range sel (the adjoint of sample_scatter_add, used by its backward).
  m.def("_sample_index(Tensor x, Tensor sel) -> Tensor");
}
