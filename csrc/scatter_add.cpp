// Schemas of the patch scatter (fused with residual add and activation) and of
// its adjoint, the patch gather that the backward pass uses.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def(
      "scatter_add(Tensor residual, Tensor packed, Tensor indices, str activation=\"relu\") "
      "-> Tensor");
  m.def(
      "scatter_add_(Tensor(a!) residual, Tensor packed, Tensor indices, "
      "str activation=\"relu\") -> ()");
  // out[p, c, i, j] = x[n, c, py*S + i, px*S + j], zero where the patch leaves the map.
  m.def("_gather_patches(Tensor x, Tensor indices, SymInt patch_size) -> Tensor");
}
