// Schemas of conv1x1_scatter_add: the spatial block's last 1x1 convolution,
// evaluated on the packed patches, fused with their scatter onto the residual,
// the add and the activation -- the (P, Cout, S, S) convolution output is never
// written to memory.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def(
      "conv1x1_scatter_add(Tensor residual, Tensor packed, Tensor indices, Tensor weight, "
      "Tensor? bias=None, str activation=\"relu\") -> Tensor");
  m.def(
      "conv1x1_scatter_add_(Tensor(a!) residual, Tensor packed, Tensor indices, Tensor weight, "
      "Tensor? bias=None, str activation=\"relu\") -> ()");
}
