// Argument checks and geometry of channel_gated_conv2d, shared by the CPU and
// CUDA backends so both reject the same calls with the same words (mirrored in
// laudnet_ops/ops/channel_gated_conv2d.py for the fake kernel).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace laudnet_ops {

struct ConvGeometry {
  int64_t N, Cin, H, W;       // input map
  int64_t Cout, KH, KW;       // weight (Cout, Cin / groups, KH, KW)
  int64_t SH, SW, PH, PW, DH, DW;
  int64_t groups;             // convolution groups
  int64_t G;                  // channels per gate group
  int64_t Ho, Wo;             // output map

  int64_t cin_g() const { return Cin / groups; }    // input channels per conv group
  int64_t cout_g() const { return Cout / groups; }  // output channels per conv group
};

// Output extent of one spatial dimension, as torch.nn.functional.conv2d computes it.
inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

inline void check_pair(c10::IntArrayRef v, const char* op, const char* arg, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", arg, " must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", arg, " must be at least ", min, ", got ", v);
}

inline void check_gates(const c10::optional<at::Tensor>& gates, const at::Tensor& x, int64_t groups_of_gates,
                        const char* op, const char* arg) {
  if (!gates.has_value()) return;
  const at::Tensor& g = *gates;
  TORCH_CHECK(g.scalar_type() == at::kBool, op, ": ", arg, " must be a bool tensor, got ", g.scalar_type());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == groups_of_gates, op, ": ", arg,
              " must have shape (N, channels / group_size) = (", x.size(0), ", ", groups_of_gates, "), got ",
              g.sizes());
  check_same_device(x, g, op, "x", arg);
}

inline ConvGeometry check_channel_conv_args(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& in_gates,
                                            const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                            c10::IntArrayRef dilation, int64_t groups, const char* op) {
  check_dim(x, 4, op, "x");
  check_dim(weight, 4, op, "weight");
  check_floating(x, op, "x");
  check_same_dtype(x, weight, op, "x", "weight");
  check_same_device(x, weight, op, "x", "weight");
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be at least 1, got ", groups);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be at least 1, got ", group_size);

  ConvGeometry g;
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.SH = stride[0];
  g.SW = stride[1];
  g.PH = padding[0];
  g.PW = padding[1];
  g.DH = dilation[0];
  g.DW = dilation[1];
  g.groups = groups;
  g.G = group_size;

  TORCH_CHECK(g.KH >= 1 && g.KW >= 1, op, ": weight must have a kernel of at least 1x1, got ", weight.sizes());
  TORCH_CHECK(g.Cin % groups == 0 && g.Cout % groups == 0, op, ": groups = ", groups,
              " must divide both Cin = ", g.Cin, " and Cout = ", g.Cout);
  TORCH_CHECK(weight.size(1) == g.Cin / groups, op,
              ": weight must have shape (Cout, Cin / groups, KH, KW) with Cin / groups = ",
              g.Cin / groups, ", got ", weight.sizes());
  TORCH_CHECK(g.Cin % group_size == 0, op, ": Cin = ", g.Cin, " is not divisible by group_size = ", group_size);
  TORCH_CHECK(g.Cout % group_size == 0, op, ": Cout = ", g.Cout, " is not divisible by group_size = ", group_size);
  TORCH_CHECK(g.cin_g() % group_size == 0 && g.cout_g() % group_size == 0, op, ": group_size = ", group_size,
              " must divide the channels of each convolution group (Cin / groups = ", g.cin_g(),
              ", Cout / groups = ", g.cout_g(), ") so that no gate group straddles two convolution groups");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.Cout, op, ": bias must have shape (Cout,) = (", g.Cout, ",), got ",
                b.sizes());
    check_same_dtype(x, b, op, "x", "bias");
    check_same_device(x, b, op, "x", "bias");
  }
  check_gates(in_gates, x, g.Cin / group_size, op, "in_gates");
  check_gates(out_gates, x, g.Cout / group_size, op, "out_gates");
  TORCH_CHECK(g.H + 2 * g.PH >= g.DH * (g.KH - 1) + 1 && g.W + 2 * g.PW >= g.DW * (g.KW - 1) + 1, op,
              ": the padded input (", g.H + 2 * g.PH, "x", g.W + 2 * g.PW,
              ") is smaller than the dilated kernel (", g.DH * (g.KH - 1) + 1, "x", g.DW * (g.KW - 1) + 1, ")");
  g.Ho = conv_out_size(g.H, g.KH, g.SH, g.PH, g.DH);
  g.Wo = conv_out_size(g.W, g.KW, g.SW, g.PW, g.DW);
  return g;
}

// The residual of channel_gated_conv2d_add_: the convolution's output map, updated in place, so it
// may share no memory with the operands it is computed from.
inline void check_channel_residual(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                   const ConvGeometry& g, const char* op) {
  check_dim(residual, 4, op, "residual");
  TORCH_CHECK(residual.size(0) == g.N && residual.size(1) == g.Cout && residual.size(2) == g.Ho &&
                  residual.size(3) == g.Wo,
              op, ": residual must have the output's shape (N, Cout, Ho, Wo) = (", g.N, ", ", g.Cout, ", ", g.Ho,
              ", ", g.Wo, "), got ", residual.sizes());
  check_same_dtype(x, residual, op, "x", "residual");
  check_same_device(x, residual, op, "x", "residual");
  TORCH_CHECK(at::has_internal_overlap(residual) != at::MemOverlap::Yes, op,
              ": residual has overlapping elements (an expanded or broadcast view); it is written in place");
  // Full or partial overlap is detected for contiguous tensors; strided views report "too hard".
  const auto shares = [&](const at::Tensor& t) {
    const at::MemOverlapStatus s = at::get_overlap_status(residual, t);
    return s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial;
  };
  TORCH_CHECK(!shares(x), op, ": residual and x share memory; residual is written in place while x is read");
  TORCH_CHECK(!shares(weight), op,
              ": residual and weight share memory; residual is written in place while weight is read");
}

// The optional channel means channel_gated_conv2d_add_ writes: (N, Cout) of the updated residual.
inline void check_channel_means(const c10::optional<at::Tensor>& means, const at::Tensor& residual, const char* op) {
  if (!means.has_value()) return;
  const at::Tensor& m = *means;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == residual.size(0) && m.size(1) == residual.size(1), op,
              ": means must have shape (N, Cout) = (", residual.size(0), ", ", residual.size(1), "), got ", m.sizes());
  check_same_dtype(residual, m, op, "residual", "means");
  check_same_device(residual, m, op, "residual", "means");
  const at::MemOverlapStatus s = at::get_overlap_status(residual, m);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, op,
              ": residual and means share memory; both are written");
}

// Every check of channel_gated_conv2d_add_, shared by its fused and unfused kernels.
inline ConvGeometry check_channel_add_args(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& in_gates,
                                           const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation, int64_t groups,
                                           const c10::optional<at::Tensor>& means, const char* op) {
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, groups, op);
  check_channel_residual(residual, x, weight, g, op);
  check_channel_means(means, residual, op);
  return g;
}

}  // namespace laudnet_ops
