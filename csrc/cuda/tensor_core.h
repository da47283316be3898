// Entry points of the tensor-core (CUTLASS/CuTe, mma.sync) CUDA kernels.
//
// Each SIMT op calls its entry point once its arguments are checked and its
// output allocated; the entry point returns true when it computed the output,
// false when the call is not eligible, the switch is off (the default, see
// tensor_core_switch.h), or the kernels were not built (tensor_core_absent.cpp
// then implements these as "false"). Eligible: float16/bfloat16, channels_last
// feature maps, 16-byte aligned data, a GPU of compute capability 8.0 or newer,
// and the per-op conditions documented on each function.
//
// RUN ON AN NVIDIA H200 (sm_90); never run on sm_80 hardware.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../channel_geometry.h"
#include "../checks.h"
#include "../spatial_conv.h"

namespace laudnet_ops {

// packed (P, Cout, S, S) channels_last; x channels_last; weight (Cout, Cin, K, K); bias undefined or (Cout,).
// Also needs Cin / groups % 8 == 0; groups > 1 only with the experimental switch on (not yet run on
// a GPU), else grouped convolutions stay on SIMT.
bool tensor_core_gather_conv2d(at::Tensor& packed, const at::Tensor& x, const at::Tensor& indices,
                               const at::Tensor& weight, const at::Tensor& bias, const GatherConvGeometry& g,
                               Activation act);

// y (N, Cout, H, W) channels_last; sums float32 (N, M, Hq, Wq) zero-filled, receives the pooled logits.
// Also needs Cin % 8 == 0.
bool tensor_core_masker_conv1x1(at::Tensor& y, at::Tensor& sums, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& mask_weight,
                                const at::Tensor& mask_bias, const MaskerGeometry& g, Activation act);

// y (N, Cout, Ho, Wo) channels_last. Also needs group_size % 8 == 0 (whole 16-byte vectors per gate
// group, hence per conv group); groups > 1 only with the experimental switch on (not yet run on a
// GPU). Gates undefined means all on.
bool tensor_core_channel_gated_conv2d(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& in_gates,
                                      const at::Tensor& out_gates, const ConvGeometry& g, Activation act);

// The block's last 1x1 conv on packed patches fused with the scatter-add: for every position
// (n, py*S+i, px*S+j) inside out's map, out = act(out + conv1x1(packed)[p, :, i, j] + bias); other
// positions untouched. packed (P, Cin, S, S) and out (N, Cout, Ho, Wo) channels_last, weight
// (Cout, Cin, 1, 1); indices valid and unique (checked by the caller). Also needs Cin % 8 == 0.
bool tensor_core_conv1x1_scatter_add(at::Tensor& out, const at::Tensor& packed, const at::Tensor& indices,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     Activation act);

}  // namespace laudnet_ops
