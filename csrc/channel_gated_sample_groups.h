// channel_gated_conv2d as one grouped vendor convolution over (sample, conv group) pairs
// (see channel_gated_sample_groups.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "channel_geometry.h"
#include "checks.h"

namespace laudnet_ops {

// y (N, Cout, Ho, Wo) in x's memory layout, as channel_gated_conv2d's contract says. Arguments checked
// by the caller (check_channel_conv_args); bias and either gate tensor may be undefined (all on).
at::Tensor channel_gated_conv2d_by_sample_groups(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                 const at::Tensor& in_gates, const at::Tensor& out_gates,
                                                 const ConvGeometry& g, Activation act);

}  // namespace laudnet_ops
