// Schemas of channel_gated_conv2d, a convolution whose input and output channel
// groups are switched on and off per sample (LAUDNet channel skipping), and of
// its in-place form with the residual add fused in; the latter's fallback for
// devices without a fused kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "channel_geometry.h"

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // in_gates: bool (N, Cin / group_size), out_gates: bool (N, Cout / group_size), None = all on.
  // y[n, c] = act(conv2d(x[n] * in_mask[n], weight, bias))[c] where c's group is on, exactly 0 elsewhere.
  m.def(
      "channel_gated_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gates, Tensor? out_gates, "
      "int group_size, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, "
      "str activation=\"relu\") -> Tensor");
  // residual = act(residual + channel_gated_conv2d(..., activation="none")), in place (inference): an
  // inactive output channel adds nothing. The last conv of a channel-skipping block, fused with its
  // residual add and ReLU; means, if given, (N, Cout) receives the updated residual's channel means.
  m.def(
      "channel_gated_conv2d_add_(Tensor(a!) residual, Tensor x, Tensor weight, Tensor? bias, Tensor? in_gates, "
      "Tensor? out_gates, int group_size, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, "
      "str activation=\"relu\", Tensor(b!)? means=None) -> ()");
}

namespace laudnet_ops {
namespace {

// Devices without a fused kernel (CUDA): the gated convolution, then the residual add and activation
// as separate passes. Same checks and same result as the fused CPU kernel.
void channel_gated_conv2d_add_unfused(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& in_gates,
                                      const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                      int64_t groups, c10::string_view activation,
                                      const c10::optional<at::Tensor>& means) {
  const char* op = "channel_gated_conv2d_add_";
  check_channel_add_args(residual, x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
                         means, op);
  const Activation act = parse_activation(activation, op);
  static const auto conv = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("laudnet_ops::channel_gated_conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                                 const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                                 int64_t, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                                 int64_t, c10::string_view)>();
  const at::Tensor y = conv.call(x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
                                 "none");
  residual.add_(y);
  if (act == Activation::kRelu) residual.relu_();
  if (means.has_value()) means->copy_(residual.mean({2, 3}));
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) {
  m.impl("channel_gated_conv2d_add_", &channel_gated_conv2d_add_unfused);
}

}  // namespace laudnet_ops
