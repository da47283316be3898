// The tensor-core entry points of a CUDA build made without the CUTLASS headers:
// no call is eligible, so every op runs its SIMT kernel. setup.py compiles this
// file instead of csrc/cuda/tensor_core/*.cu when CUTLASS is not found.
#include <torch/library.h>

#include "tensor_core.h"

namespace laudnet_ops {

bool tensor_core_gather_conv2d(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const GatherConvGeometry&, Activation) {
  return false;
}

bool tensor_core_masker_conv1x1(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const MaskerGeometry&, Activation) {
  return false;
}

bool tensor_core_channel_gated_conv2d(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const ConvGeometry&, Activation) {
  return false;
}

bool tensor_core_conv1x1_scatter_add(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, Activation) {
  return false;
}

namespace {

bool conv1x1_scatter_add_absent(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, c10::string_view) {
  return false;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) {
  m.impl("_tensor_core_conv1x1_scatter_add_", &conv1x1_scatter_add_absent);
}

}  // namespace laudnet_ops
