// Schema of the fused first 1x1 convolution and spatial masker: y and the
// pooled masker logits from one read of x.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def(
      "masker_conv1x1(Tensor x, Tensor weight, Tensor? bias, Tensor mask_weight, Tensor? mask_bias, "
      "SymInt patch_size, SymInt stride=1, str activation=\"relu\") -> (Tensor, Tensor)");
}
