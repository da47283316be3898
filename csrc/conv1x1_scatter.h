// Argument checks of conv1x1_scatter_add (the block's last 1x1 convolution on
// packed patches fused with the patch scatter, residual add and activation),
// shared by the CPU and CUDA backends so both reject the same calls with the
// same words. The Python fake kernel (laudnet_ops/ops/conv1x1_scatter_add.py)
// mirrors them in the same order.
#pragma once

#include <c10/util/Optional.h>

#include "patch_geometry.h"

namespace laudnet_ops {

struct Conv1x1ScatterGeometry {
  PatchGeometry out;  // the residual map: C = Cout, P patches of S x S
  int64_t Cin;        // packed's channels, the 1x1 convolution's input
};

inline Conv1x1ScatterGeometry check_conv1x1_scatter_args(const at::Tensor& residual, const at::Tensor& packed,
                                                         const at::Tensor& indices, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias, const char* op) {
  check_dim(residual, 4, op, "residual");
  check_dim(packed, 4, op, "packed");
  check_dim(weight, 4, op, "weight");
  check_floating(residual, op, "residual");
  check_same_dtype(residual, packed, op, "residual", "packed");
  check_same_dtype(residual, weight, op, "residual", "weight");
  check_same_device(residual, packed, op, "residual", "packed");
  check_same_device(residual, weight, op, "residual", "weight");
  check_same_device(residual, indices, op, "residual", "indices");
  check_indices_shape(indices, op);
  const int64_t S = packed.size(2);
  TORCH_CHECK(S >= 1, op, ": patch size (packed.size(2)) must be at least 1, got ", S);
  TORCH_CHECK(packed.size(3) == S, op, ": packed must have shape (P, Cin, S, S), got ", packed.sizes());
  TORCH_CHECK(weight.size(2) == 1 && weight.size(3) == 1, op,
              ": weight must be a 1x1 kernel, shape (Cout, Cin, 1, 1), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == packed.size(1), op, ": weight has ", weight.size(1),
              " input channels but packed has ", packed.size(1));
  TORCH_CHECK(weight.size(0) == residual.size(1), op, ": weight has ", weight.size(0),
              " output channels but residual has ", residual.size(1));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    check_same_dtype(residual, *bias, op, "residual", "bias");
    check_same_device(residual, *bias, op, "residual", "bias");
  }
  TORCH_CHECK(packed.size(0) == indices.size(0), op, ": packed holds ", packed.size(0),
              " patches but indices has ", indices.size(0), " rows");
  return Conv1x1ScatterGeometry{make_geometry(residual, S, indices.size(0)), packed.size(1)};
}

}  // namespace laudnet_ops
