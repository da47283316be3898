// masker_conv1x1 and conv1x1_scatter_add as a few ATen steps around the vendor convolution
// (see conv1x1_composites.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "checks.h"
#include "spatial_conv.h"

namespace laudnet_ops {

// (y, logits) as masker_conv1x1's contract says, in x's layout; arguments checked by the caller, the
// map not empty. Biases may be undefined.
std::tuple<at::Tensor, at::Tensor> masker_conv1x1_by_dense_conv(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, const at::Tensor& mask_weight,
                                                                const at::Tensor& mask_bias, const MaskerGeometry& g,
                                                                Activation act);

// act(residual + the scatter of conv1x1(packed)), out of place and in place: the 1x1 convolution of
// the packed patches by the vendor convolution, landed by the scatter_add ops (whose checks run again).
// Arguments checked by the caller; bias may be undefined.
at::Tensor conv1x1_scatter_add_by_dense_conv(const at::Tensor& residual, const at::Tensor& packed,
                                             const at::Tensor& indices, const at::Tensor& weight,
                                             const at::Tensor& bias, c10::string_view activation);
void conv1x1_scatter_add_by_dense_conv_(const at::Tensor& residual, const at::Tensor& packed,
                                        const at::Tensor& indices, const at::Tensor& weight, const at::Tensor& bias,
                                        c10::string_view activation);

}  // namespace laudnet_ops
