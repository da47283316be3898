// masker_conv1x1 and conv1x1_scatter_add through the vendor convolution, for the CUDA calls the
// tensor-core kernels decline (float32, float64, NCHW, channel counts off the 16-byte vector). There
// the alternative is a one-thread-per-output SIMT kernel, 70-170x slower than the tensor cores on an
// H200 (benchmarks/results/gpu.md), while these are dense 1x1 convolutions that cuDNN runs at its own
// speed:
//
//   masker_conv1x1       y = act(conv1x1(x)); the masker's M channels by a second 1x1 convolution,
//                        averaged over each mask cell by avg_pool2d (ceil mode: a border cell is the
//                        mean of the pixels it holds, as the contract says);
//   conv1x1_scatter_add  the 1x1 convolution of the packed patches, then the scatter_add op (the same
//                        device's kernel) lands them -- the (P, Cout, S, S) result is written once,
//                        which the fused kernels avoid.
//
// The masker's logits are pooled from the convolution's output in the input dtype (the SIMT kernel
// accumulates them unrounded); for float16/bfloat16 they differ by that rounding.
//
// EXPERIMENTAL on CUDA: device-agnostic ATen whose results are tested on the CPU
// (tests/test_conv1x1_composites.py), but not yet run on a GPU, so the CUDA ops take these only with
// the experimental switch on (tensor_core_switch.h).
#include "conv1x1_composites.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/conv2d.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <array>

#include "conv1x1_scatter.h"

namespace laudnet_ops {
namespace {

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masker_conv1x1_by_dense_conv(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, const at::Tensor& mask_weight,
                                                                const at::Tensor& mask_bias, const MaskerGeometry& g,
                                                                Activation act) {
  const at::MemoryFormat layout = feature_layout(x);
  const at::Tensor src = x.contiguous(layout);
  at::Tensor y = at::conv2d(src, weight, optional_of(bias));
  if (act == Activation::kRelu) y.relu_();
  const at::Tensor m = at::conv2d(src, mask_weight, optional_of(mask_bias));  // (N, M, H, W)
  const std::array<int64_t, 2> window{g.window, g.window}, no_padding{0, 0};
  // ceil mode and no padding: the last cell along each side holds what is left of the map, and
  // avg_pool2d divides a cell's sum by the pixels it holds.
  at::Tensor logits = at::avg_pool2d(m, window, window, no_padding, /*ceil_mode=*/true);
  return {y.contiguous(layout), logits.contiguous(layout)};
}

namespace {

at::Tensor conv1x1_of_patches(const at::Tensor& packed, const at::Tensor& weight, const at::Tensor& bias) {
  return at::conv2d(packed.contiguous(feature_layout(packed)), weight, optional_of(bias));
}

}  // namespace

at::Tensor conv1x1_scatter_add_by_dense_conv(const at::Tensor& residual, const at::Tensor& packed,
                                             const at::Tensor& indices, const at::Tensor& weight,
                                             const at::Tensor& bias, c10::string_view activation) {
  static const auto scatter_add = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("laudnet_ops::scatter_add", "")
                                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        c10::string_view)>();
  return scatter_add.call(residual, conv1x1_of_patches(packed, weight, bias), indices, activation);
}

void conv1x1_scatter_add_by_dense_conv_(const at::Tensor& residual, const at::Tensor& packed,
                                        const at::Tensor& indices, const at::Tensor& weight, const at::Tensor& bias,
                                        c10::string_view activation) {
  static const auto scatter_add_ = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("laudnet_ops::scatter_add_", "")
                                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   c10::string_view)>();
  scatter_add_.call(residual, conv1x1_of_patches(packed, weight, bias), indices, activation);
}

namespace {

// The internal ops that let tests run the composites on any device (the CUDA ops reach them only
// with the experimental switch on).
std::tuple<at::Tensor, at::Tensor> masker_op(const at::Tensor& x, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias, const at::Tensor& mask_weight,
                                             const c10::optional<at::Tensor>& mask_bias, int64_t patch_size,
                                             int64_t stride, c10::string_view activation) {
  const char* op = "_masker_conv1x1_by_dense_conv";
  const MaskerGeometry g = check_masker_args(x, weight, bias, mask_weight, mask_bias, patch_size, stride, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  const at::Tensor mb = mask_bias.has_value() && mask_bias->defined() ? *mask_bias : at::Tensor();
  return masker_conv1x1_by_dense_conv(x, weight, b, mask_weight, mb, g, act);
}

at::Tensor conv1x1_scatter_add_op(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  c10::string_view activation) {
  const char* op = "_conv1x1_scatter_add_by_dense_conv";
  check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  parse_activation(activation, op);
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return conv1x1_scatter_add_by_dense_conv(residual, packed, indices, weight, b, activation);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def("_masker_conv1x1_by_dense_conv(Tensor x, Tensor weight, Tensor? bias, Tensor mask_weight, "
        "Tensor? mask_bias, int patch_size, int stride, str activation) -> (Tensor, Tensor)");
  m.def("_conv1x1_scatter_add_by_dense_conv(Tensor residual, Tensor packed, Tensor indices, Tensor weight, "
        "Tensor? bias, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) {
  m.impl("_masker_conv1x1_by_dense_conv", &masker_op);
  m.impl("_conv1x1_scatter_add_by_dense_conv", &conv1x1_scatter_add_op);
}

}  // namespace laudnet_ops
