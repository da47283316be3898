// Schema of masked_conv1x1, a 1x1 convolution computed only on the pixels a
// mask keeps (a spatial block's first convolution, on the input pixels that
// its kept output patches read); the fallback for devices without a kernel.
#include <ATen/ops/conv2d.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "activation.h"
#include "spatial_conv.h"

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // mask: bool (N, H, W). y[n, :, h, w] = act(conv1x1(x, weight, bias))[n, :, h, w] where mask[n, h, w],
  // exactly 0 elsewhere.
  m.def("masked_conv1x1(Tensor x, Tensor mask, Tensor weight, Tensor? bias, str activation=\"relu\") -> Tensor");
}

namespace laudnet_ops {
namespace {

// Devices without a kernel of their own (CUDA): the dense convolution, then the mask. Same checks and
// result as the CPU kernel, at dense cost. Tested on the CPU by dispatching to it; not yet run on a GPU.
at::Tensor masked_conv1x1_dense(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "masked_conv1x1";
  check_masked_conv_args(x, mask, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  if (x.numel() == 0 || weight.numel() == 0) {  // conv2d refuses zero-sized maps and channels
    return at::zeros({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options().memory_format(feature_layout(x)));
  }
  at::Tensor y = at::conv2d(x, weight, bias).contiguous(feature_layout(x));
  if (act == Activation::kRelu) y.relu_();
  return y.masked_fill_(mask.logical_not().unsqueeze(1), 0);  // 0 even where x holds inf or NaN
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) { m.impl("masked_conv1x1", &masked_conv1x1_dense); }

}  // namespace laudnet_ops
