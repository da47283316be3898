// Argument checks and geometry of the spatial-skipping convolutions
// (gather_conv2d, masker_conv1x1 and masked_conv1x1), shared by the CPU and CUDA backends so
// both reject the same calls with the same words. The Python fake kernels
// (laudnet_ops/ops/gather_conv2d.py, masker_conv1x1.py) mirror them.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <algorithm>

#include "patch_geometry.h"

namespace laudnet_ops {

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t channels,
                       const char* op, const char* arg) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, op, ": ", arg, " must have shape (",
              channels, ",), got ", bias->sizes());
  check_same_dtype(x, *bias, op, "x", arg);
  check_same_device(x, *bias, op, "x", arg);
}

// ---------------------------------------------------------------- gather_conv2d

struct GatherConvGeometry {
  int64_t N, Cin, H, W;                        // the dense input map
  int64_t Cout, K;                             // weight (Cout, Cin / groups, K, K)
  int64_t stride, padding, dilation, groups;
  int64_t Cg, Cog;                             // input and output channels per group
  int64_t Ho, Wo;                              // the convolution's output map
  int64_t S, Hp, Wp, P;                        // patch grid over the output map

  // Side of the input window that one S x S output tile reads.
  int64_t halo() const { return (S - 1) * stride + dilation * (K - 1) + 1; }
  // The patch geometry of the output map (what indices address).
  PatchGeometry output_patches() const { return PatchGeometry{N, Cout, Ho, Wo, S, Hp, Wp, P}; }
};

inline GatherConvGeometry check_gather_conv_args(const at::Tensor& x, const at::Tensor& indices,
                                                 const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t patch_size,
                                                 int64_t stride, int64_t padding, int64_t dilation,
                                                 int64_t groups, const char* op) {
  check_dim(x, 4, op, "x");
  check_floating(x, op, "x");
  check_dim(weight, 4, op, "weight");
  check_same_dtype(x, weight, op, "x", "weight");
  check_same_device(x, weight, op, "x", "weight");
  check_same_device(x, indices, op, "x", "indices");
  check_indices_shape(indices, op);
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be at least 1, got ", patch_size);
  TORCH_CHECK(stride >= 1, op, ": stride must be at least 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be at least 1, got ", dilation);
  TORCH_CHECK(groups >= 1, op, ": groups must be at least 1, got ", groups);
  TORCH_CHECK(weight.size(2) == weight.size(3) && weight.size(2) >= 1, op,
              ": weight must have a square kernel, shape (Cout, Cin / groups, k, k), got ", weight.sizes());
  GatherConvGeometry g;
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.K = weight.size(2);
  g.stride = stride;
  g.padding = padding;
  g.dilation = dilation;
  g.groups = groups;
  TORCH_CHECK(g.Cin % groups == 0 && g.Cout % groups == 0, op, ": groups (", groups,
              ") must divide both x's channels (", g.Cin, ") and weight's output channels (", g.Cout, ")");
  TORCH_CHECK(weight.size(1) * groups == g.Cin, op, ": weight has ", weight.size(1),
              " input channels per group, but x has ", g.Cin, " channels in ", groups, " groups");
  check_bias(bias, x, g.Cout, op, "bias");
  g.Cg = g.Cin / groups;
  g.Cog = g.Cout / groups;
  const int64_t span = dilation * (g.K - 1) + 1;
  TORCH_CHECK(g.H + 2 * padding >= span && g.W + 2 * padding >= span, op, ": the ", g.K, "x", g.K,
              " kernel with dilation ", dilation, " (span ", span, ") does not fit the ", g.H, "x", g.W,
              " input with padding ", padding);
  g.Ho = (g.H + 2 * padding - span) / stride + 1;
  g.Wo = (g.W + 2 * padding - span) / stride + 1;
  g.S = patch_size;
  g.Hp = ceil_div(g.Ho, g.S);
  g.Wp = ceil_div(g.Wo, g.S);
  g.P = indices.size(0);
  return g;
}

// ---------------------------------------------------------------- masker_conv1x1

struct MaskerGeometry {
  int64_t N, Cin, H, W;  // the input map; y has the same H x W
  int64_t Cout, M;       // conv channels, masker channels
  int64_t S, stride;
  int64_t window;        // S * stride: input pixels per mask cell along each side
  int64_t Hq, Wq;        // mask grid: ceil(ceil(H / stride) / S) = ceil(H / window)

  // Number of input pixels a mask cell averages (clipped at the bottom and right borders).
  C10_HOST_DEVICE int64_t cell_rows(int64_t qy) const { return H - qy * window < window ? H - qy * window : window; }
  C10_HOST_DEVICE int64_t cell_cols(int64_t qx) const { return W - qx * window < window ? W - qx * window : window; }
};

inline void check_1x1_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* arg,
                             const char* rows) {
  check_dim(w, 4, op, arg);
  check_same_dtype(x, w, op, "x", arg);
  check_same_device(x, w, op, "x", arg);
  TORCH_CHECK(w.size(2) == 1 && w.size(3) == 1, op, ": ", arg, " must be a 1x1 kernel, shape (", rows,
              ", Cin, 1, 1), got ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), op, ": ", arg, " has ", w.size(1), " input channels but x has ",
              x.size(1));
}

inline MaskerGeometry check_masker_args(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& mask_weight,
                                        const c10::optional<at::Tensor>& mask_bias, int64_t patch_size,
                                        int64_t stride, const char* op) {
  check_dim(x, 4, op, "x");
  check_floating(x, op, "x");
  check_1x1_weight(weight, x, op, "weight", "Cout");
  check_1x1_weight(mask_weight, x, op, "mask_weight", "M");
  TORCH_CHECK(mask_weight.size(0) >= 1, op, ": mask_weight must have at least one masker channel, got ",
              mask_weight.sizes());
  check_bias(bias, x, weight.size(0), op, "bias");
  check_bias(mask_bias, x, mask_weight.size(0), op, "mask_bias");
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be at least 1, got ", patch_size);
  TORCH_CHECK(stride >= 1, op, ": stride must be at least 1, got ", stride);
  MaskerGeometry g;
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.M = mask_weight.size(0);
  g.S = patch_size;
  g.stride = stride;
  g.window = patch_size * stride;
  g.Hq = ceil_div(g.H, g.window);
  g.Wq = ceil_div(g.W, g.window);
  return g;
}

// ---------------------------------------------------------------- masked_conv1x1

struct MaskedConvGeometry {
  int64_t N, Cin, H, W, Cout;
  int64_t pixels() const { return N * H * W; }
};

inline MaskedConvGeometry check_masked_conv_args(const at::Tensor& x, const at::Tensor& mask,
                                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                 const char* op) {
  check_dim(x, 4, op, "x");
  check_floating(x, op, "x");
  check_1x1_weight(weight, x, op, "weight", "Cout");
  check_bias(bias, x, weight.size(0), op, "bias");
  check_same_device(x, mask, op, "x", "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2) && mask.size(2) == x.size(3),
              op, ": mask must have shape (N, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ",
              mask.sizes());
  return MaskedConvGeometry{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0)};
}

}  // namespace laudnet_ops
