// Schema of the gather convolution: a dense convolution evaluated only on the
// S x S output patches that indices names, packed as (P, Cout, S, S).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def(
      "gather_conv2d(Tensor x, Tensor indices, Tensor weight, Tensor? bias, SymInt patch_size, "
      "SymInt stride=1, SymInt padding=0, SymInt dilation=1, SymInt groups=1, "
      "str activation=\"relu\") -> Tensor");
}
