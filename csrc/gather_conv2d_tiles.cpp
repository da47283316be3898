// gather_conv2d through the vendor convolution: copy each active patch's input window (its halo tile,
// padding included) into a batch of tiles, run one dense convolution over that batch with padding 0
// -- each tile yields exactly its S x S outputs, so no FLOP is spent outside the kept patches -- then
// zero the positions of border patches that lie outside the output map.
//
// The CUDA op's path for the calls its tensor-core kernel cannot take (float32, float64, grouped or
// channel counts off the 16-byte vector, NCHW): there the alternative is a one-thread-per-output
// SIMT kernel, 70-170x slower than the tensor cores on an H200, while cuDNN runs the tiles at its own
// speed. The price is the tile copy: (halo / S)^2 times the kept input bytes (2.25x at S = 4 for a
// 3x3 conv, 9x at S = 1).
//
// EXPERIMENTAL on CUDA: the code is device-agnostic ATen and its results are tested on the CPU
// (tests/test_gather_conv2d_tiles.py), but it has not run on a GPU, so the CUDA op takes it only with
// the experimental switch on (tensor_core_switch.h).
#include "gather_conv2d_tiles.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index.h>
#include <ATen/ops/tensor.h>
#include <ATen/core/List.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace laudnet_ops {
namespace {

// The tiles, (P, Cin, T, T) in x's layout: for channels_last the gather copies whole (T, T, Cin)
// windows, each a run of contiguous channel vectors in x.
at::Tensor halo_tiles(const at::Tensor& x, const at::Tensor& n, const at::Tensor& py, const at::Tensor& px,
                      const GatherConvGeometry& g) {
  const int64_t T = g.halo(), step = g.S * g.stride;
  // Pad so that the window of the last (border) patch lies inside the padded map.
  const int64_t bottom = std::max<int64_t>(0, (g.Hp - 1) * step + T - (g.H + 2 * g.padding));
  const int64_t right = std::max<int64_t>(0, (g.Wp - 1) * step + T - (g.W + 2 * g.padding));
  const at::Tensor xp = at::constant_pad_nd(x, {g.padding, g.padding + right, g.padding, g.padding + bottom});
  const at::Tensor windows = xp.unfold(2, T, step).unfold(3, T, step);  // (N, Cin, Hq, Wq, T, T), a view
  c10::List<c10::optional<at::Tensor>> at_patch;
  for (const at::Tensor& t : {n, py, px}) at_patch.push_back(t);
  if (feature_layout(x) == at::MemoryFormat::ChannelsLast) {
    return at::index(windows.permute({0, 2, 3, 4, 5, 1}), at_patch).permute({0, 3, 1, 2});
  }
  return at::index(windows.permute({0, 2, 3, 1, 4, 5}), at_patch);
}

}  // namespace

at::Tensor gather_conv2d_by_tiles(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                                  const at::Tensor& bias, const GatherConvGeometry& g, Activation act) {
  const at::MemoryFormat layout = feature_layout(x);
  if (g.P == 0) return at::empty({0, g.Cout, g.S, g.S}, x.options().memory_format(layout));
  const at::Tensor rows = indices.to(at::kLong);
  const at::Tensor n = rows.select(1, 0), py = rows.select(1, 1), px = rows.select(1, 2);
  const at::Tensor tiles = halo_tiles(x, n, py, px, g);
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  const std::array<int64_t, 2> stride{g.stride, g.stride}, no_padding{0, 0}, dilation{g.dilation, g.dilation};
  at::Tensor out = at::conv2d(tiles, weight, b, stride, no_padding, dilation, g.groups);
  if (act == Activation::kRelu) out.relu_();
  if (g.Ho % g.S != 0 || g.Wo % g.S != 0) {  // border patches reach past the map: zeros there
    const at::Tensor offsets = at::arange(g.S, rows.options());
    const at::Tensor row_in = py.unsqueeze(1).mul(g.S).add(offsets).lt(g.Ho);  // (P, S)
    const at::Tensor col_in = px.unsqueeze(1).mul(g.S).add(offsets).lt(g.Wo);
    const at::Tensor inside = row_in.unsqueeze(2).logical_and(col_in.unsqueeze(1)).unsqueeze(1);  // (P, 1, S, S)
    out.masked_fill_(inside.logical_not(), 0);
  }
  return out.contiguous(layout);
}

namespace {

// The internal op that lets tests run the composite on any device (the CUDA op reaches it only with
// the experimental switch on).
at::Tensor gather_conv2d_by_tiles_op(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t patch_size, int64_t stride,
                                     int64_t padding, int64_t dilation, int64_t groups,
                                     c10::string_view activation) {
  const char* op = "_gather_conv2d_by_tiles";
  const GatherConvGeometry g =
      check_gather_conv_args(x, indices, weight, bias, patch_size, stride, padding, dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  // The windows view is larger than the patch grid, so its own bounds checks would let some invalid
  // rows through.
  if (g.P > 0) {
    const at::Tensor rows = indices.to(at::kLong);
    const at::Tensor limits = at::tensor({g.N, g.Hp, g.Wp}, rows.options());
    TORCH_CHECK(rows.ge(0).logical_and(rows.lt(limits)).all().item<bool>(), op,
                ": every row of indices must name a patch of the (N, Hp, Wp) = (", g.N, ", ", g.Hp, ", ", g.Wp,
                ") output grid");
  }
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return gather_conv2d_by_tiles(x, indices, weight, b, g, act);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def("_gather_conv2d_by_tiles(Tensor x, Tensor indices, Tensor weight, Tensor? bias, int patch_size, "
        "int stride, int padding, int dilation, int groups, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) {
  m.impl("_gather_conv2d_by_tiles", &gather_conv2d_by_tiles_op);
}

}  // namespace laudnet_ops
