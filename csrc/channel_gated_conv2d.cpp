// Schema of channel_gated_conv2d: a convolution whose input and output channel
// groups are switched on and off per sample (LAUDNet channel skipping).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // in_gates: bool (N, Cin / group_size), out_gates: bool (N, Cout / group_size), None = all on.
  // y[n, c] = act(conv2d(x[n] * in_mask[n], weight, bias))[c] where c's group is on, exactly 0 elsewhere.
  m.def(
      "channel_gated_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gates, Tensor? out_gates, "
      "int group_size, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, "
      "str activation=\"relu\") -> Tensor");
}
