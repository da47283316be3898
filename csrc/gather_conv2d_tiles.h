// gather_conv2d as a few ATen steps over halo tiles (see gather_conv2d_tiles.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "spatial_conv.h"

namespace laudnet_ops {

// packed (P, Cout, S, S) in x's memory layout, as gather_conv2d's contract says. Arguments checked by
// the caller (check_gather_conv_args) and indices validated against the output patch grid; bias may
// be undefined.
at::Tensor gather_conv2d_by_tiles(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                                  const at::Tensor& bias, const GatherConvGeometry& g, Activation act);

}  // namespace laudnet_ops
