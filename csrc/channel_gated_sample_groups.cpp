// channel_gated_conv2d through the vendor convolution, computing only the active channels: every
// (sample, conv group) pair becomes one group of a single grouped convolution, whose input channels
// are that pair's active input channels and whose weights are the rows of its active output channels
// restricted to the columns of its active inputs.
//
// Pairs keep different numbers of channels, so each is padded to the largest count in the batch (K
// inputs, O outputs; one host read gives both): a pair's channel list is its active channels in
// order, then as many of its inactive ones as the padding needs. A padded input slot's gathered
// values are zeroed (an inactive channel may hold anything), so it adds nothing; a padded output
// slot's values are zeroed after the activation, so its weights and bias need no masking. Padded
// slots name inactive channels, distinct within a sample, so the scatter into the zero-initialised
// output writes every channel at most once.
//
// Work: N * groups * O * K * KH * KW multiply-adds per output pixel's worth of the dense conv, i.e.
// about rate_in * rate_out of the dense FLOPs when the gate density is even across the batch. Memory:
// the gathered input (K / Cin_g of x), a per-pair copy of the weights (N * O * K * KH * KW elements,
// N * rate_in * rate_out times the weight), and the output written twice (zeros, then the kept
// channels). For channels_last x the gathered input is laid out (H, W, N * groups * K), so the grouped
// convolution itself runs channels_last.
//
// The CUDA op's path for the calls its tensor-core kernel declines (float32, float64, gate groups of
// 4, NCHW): the alternative there is a one-thread-per-output SIMT kernel, about 190x slower than
// cuDNN's dense conv on an H200.
//
// EXPERIMENTAL on CUDA: device-agnostic ATen, its results tested on the CPU
// (tests/test_channel_gated_sample_groups.py), not yet run on a GPU; the CUDA op takes it only with
// the experimental switch on (tensor_core_switch.h).
#include "channel_gated_sample_groups.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/index.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace laudnet_ops {
namespace {

// A pair's channel list: (N, groups, Cg) local channel indices, active first (each part in channel
// order), and the active counts (N, groups).
struct ChannelLists {
  at::Tensor order, counts;
};

// (N, channels) bool: each gate repeated over its G channels; all on without gates.
at::Tensor channel_mask(const at::Tensor& gates, int64_t N, int64_t channels, int64_t G, const at::TensorOptions& on) {
  return gates.defined() ? gates.repeat_interleave(G, 1) : at::ones({N, channels}, on.dtype(at::kBool));
}

ChannelLists channel_lists(const at::Tensor& gates, int64_t N, int64_t channels, int64_t groups, int64_t G,
                           const at::TensorOptions& on) {
  const at::Tensor mask = channel_mask(gates, N, channels, G, on).view({N, groups, channels / groups});
  // Sorting "is inactive" (0 before 1) stably keeps each part in channel order.
  const at::Tensor order = at::argsort(mask.logical_not().to(at::kByte), /*stable=*/true, /*dim=*/-1);
  return {order, mask.sum(-1)};
}

// (N, groups, slots) bool: slot s of a pair holds one of its active channels.
at::Tensor valid_slots(const at::Tensor& counts, int64_t slots) {
  return at::arange(slots, counts.options()).view({1, 1, slots}).lt(counts.unsqueeze(-1));
}

// The pairs' active input channels, (1, N * groups * K, H, W); channels_last when x is.
at::Tensor gathered_input(const at::Tensor& x, const at::Tensor& channels, const at::Tensor& valid,
                          const ConvGeometry& g) {
  const int64_t C = channels.size(1);  // groups * K
  const at::Tensor index = channels.view({g.N, C, 1, 1}).expand({g.N, C, g.H, g.W});
  const at::Tensor zero_slots = valid.view({g.N, C, 1, 1}).logical_not();
  if (feature_layout(x) == at::MemoryFormat::ChannelsLast) {
    // (H, W, N, C) storage: seen as (1, N * C, H, W) it is a channels_last map of one sample.
    at::Tensor buffer = at::empty({g.H, g.W, g.N, C}, x.options());
    at::Tensor as_nchw = buffer.permute({2, 3, 0, 1});
    at::gather_out(as_nchw, x, 1, index);
    as_nchw.masked_fill_(zero_slots, 0);
    return buffer.view({g.H, g.W, 1, g.N * C}).permute({2, 3, 0, 1});
  }
  at::Tensor out = at::gather(x, 1, index).masked_fill_(zero_slots, 0);
  return out.view({1, g.N * C, g.H, g.W});
}

}  // namespace

at::Tensor channel_gated_conv2d_by_sample_groups(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                 const at::Tensor& in_gates, const at::Tensor& out_gates,
                                                 const ConvGeometry& g, Activation act) {
  const at::MemoryFormat layout = feature_layout(x);
  const at::TensorOptions index_opts = x.options().dtype(at::kLong);
  // (at::zeros would drop the memory format of its options)
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(layout)).zero_();
  if (out.numel() == 0) return out;
  const int64_t Cg = g.cin_g(), Og = g.cout_g();
  if (Cg == 0) {  // no input channel: an active output is act(bias), constant over the map
    if (!bias.defined()) return out;
    at::Tensor v = act == Activation::kRelu ? bias.relu() : bias;
    const at::Tensor on = channel_mask(out_gates, g.N, g.Cout, g.G, index_opts);
    const at::Tensor per_sample = v.view({1, g.Cout}).expand({g.N, g.Cout}).masked_fill(on.logical_not(), 0);
    return out.copy_(per_sample.view({g.N, g.Cout, 1, 1}).expand_as(out));
  }
  const ChannelLists in = channel_lists(in_gates, g.N, g.Cin, g.groups, g.G, index_opts);
  const ChannelLists outs = channel_lists(out_gates, g.N, g.Cout, g.groups, g.G, index_opts);
  // The padded counts size every tensor below: the path's one host synchronisation.
  const at::Tensor most = at::stack({in.counts.max(), outs.counts.max()}).cpu();
  const int64_t O = most[1].item<int64_t>();
  if (O == 0) return out;  // every output channel off
  const int64_t K = std::max<int64_t>(most[0].item<int64_t>(), 1);  // no active input: one zero slot

  const at::Tensor in_local = in.order.narrow(-1, 0, K);  // (N, groups, K)
  const at::Tensor out_local = outs.order.narrow(-1, 0, O);
  const at::Tensor in_valid = valid_slots(in.counts, K), out_valid = valid_slots(outs.counts, O);
  const at::Tensor group_ids = at::arange(g.groups, index_opts).view({1, g.groups, 1});
  const at::Tensor in_global = in_local.add(group_ids.mul(Cg)).view({g.N, g.groups * K});
  const at::Tensor out_global = out_local.add(group_ids.mul(Og));  // (N, groups, O)

  const at::Tensor xin = gathered_input(x, in_global, in_valid.view({g.N, g.groups * K}), g);
  // Each pair's weights: rows of its output channels, columns (inside its conv group) of its inputs.
  c10::List<c10::optional<at::Tensor>> rows_cols;
  rows_cols.push_back(c10::optional<at::Tensor>(out_global.unsqueeze(-1)));
  rows_cols.push_back(c10::optional<at::Tensor>(in_local.unsqueeze(-2)));
  const at::Tensor w = at::index(weight, rows_cols).view({g.N * g.groups * O, K, g.KH, g.KW});
  c10::optional<at::Tensor> b;
  if (bias.defined()) b = bias.index_select(0, out_global.flatten());
  const std::array<int64_t, 2> stride{g.SH, g.SW}, padding{g.PH, g.PW}, dilation{g.DH, g.DW};
  at::Tensor y = at::conv2d(xin, w, b, stride, padding, dilation, g.N * g.groups);  // (1, N*groups*O, Ho, Wo)
  if (act == Activation::kRelu) y.relu_();

  // Back to (N, groups * O, Ho, Wo): for a channels_last y the reshape is a view of its storage.
  const int64_t C = g.groups * O;
  const at::Tensor per_sample = layout == at::MemoryFormat::ChannelsLast
                                    ? y.permute({0, 2, 3, 1}).reshape({g.Ho, g.Wo, g.N, C}).permute({2, 3, 0, 1})
                                    : y.reshape({g.N, C, g.Ho, g.Wo});
  per_sample.masked_fill_(out_valid.view({g.N, C, 1, 1}).logical_not(), 0);
  out.scatter_(1, out_global.view({g.N, C, 1, 1}).expand({g.N, C, g.Ho, g.Wo}), per_sample);
  return out;
}

namespace {

// The internal op that lets tests run the composite on any device (the CUDA op reaches it only with
// the experimental switch on).
at::Tensor channel_gated_conv2d_by_sample_groups_op(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const c10::optional<at::Tensor>& in_gates,
                                                    const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                    c10::IntArrayRef dilation, int64_t groups,
                                                    c10::string_view activation) {
  const char* op = "_channel_gated_conv2d_by_sample_groups";
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  const auto defined = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  return channel_gated_conv2d_by_sample_groups(x, weight, defined(bias), defined(in_gates), defined(out_gates), g,
                                               act);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  m.def("_channel_gated_conv2d_by_sample_groups(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gates, "
        "Tensor? out_gates, int group_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) {
  m.impl("_channel_gated_conv2d_by_sample_groups", &channel_gated_conv2d_by_sample_groups_op);
}

}  // namespace laudnet_ops
