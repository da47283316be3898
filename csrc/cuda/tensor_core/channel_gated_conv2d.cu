// Tensor-core channel_gated_conv2d: a grouped GEMM over samples and convolution groups (blockIdx.z =
// sample * groups + conv group), each gathering its own active weight rows (output channels) and
// columns (input channels).
//
// RUN ON AN NVIDIA H200 (sm_90): tests/test_tensor_cores.py passes there against the reference
// (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. On where built (see
// tensor_core_switch.h).
//
// Per z = (sample n, conv group gi): rows = the sample's Ho*Wo output pixels; columns = the group's
// output channels, active ones first (out_list[z, :out_count[z]]), then the inactive ones, which get
// no loads and no MMA (whole inactive column tiles skip the K loop) and are written as exact zeros;
// K = taps x the group's active input channels, walked as 16-byte vectors listed in
// in_list[z, :in_count[z]]. The lists are built on the device from the gates. Eligible: group_size
// a multiple of 8, so a gate group -- and a conv group, which holds whole gate groups -- is whole
// 16-byte vectors (group_size 4 stays on the SIMT kernel).
//
// EXPERIMENTAL for groups > 1 (RegNet's grouped 3x3): its index math passes the CPU emulation tests,
// but it has not run on a GPU, so grouped calls take it only with the experimental switch on
// (tensor_core_switch.h). With groups == 1, z is the sample and the group offsets are zero.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tensor_core.h"
#include "common.cuh"
#include "gather_gemm.cuh"

namespace laudnet_ops {
namespace tc {
namespace {

// The gate lists of z = (sample n, conv group gi): its active input vectors (absolute channel
// offsets) and its output channels (absolute), active ones first. Gates are (N, C / G); a conv group
// holds whole gate groups (argument check), so the lists walk the group's gates, not its channels.
struct GateListSizes {
  int Cin, Cout, groups, G;
};

CUTE_HOST_DEVICE void gate_lists_of(int64_t z, const bool* in_gates, const bool* out_gates, GateListSizes s,
                                    int32_t* in_list, int32_t* in_count, int32_t* out_list, int32_t* out_count) {
  const int64_t n = z / s.groups;
  const int gi = static_cast<int>(z - n * s.groups);
  const int Cg = s.Cin / s.groups, Cog = s.Cout / s.groups;
  const int in_per_group = Cg / s.G, out_per_group = Cog / s.G;  // gate groups per conv group
  const bool* gin = in_gates != nullptr ? in_gates + n * (s.Cin / s.G) : nullptr;
  const bool* gout = out_gates != nullptr ? out_gates + n * (s.Cout / s.G) : nullptr;
  int count = 0;
  for (int q = gi * in_per_group; q < (gi + 1) * in_per_group; ++q) {
    if (gin != nullptr && !gin[q]) continue;
    for (int c = q * s.G; c < (q + 1) * s.G; c += kVec) in_list[z * (Cg / kVec) + count++] = c;
  }
  in_count[z] = count;
  count = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int q = gi * out_per_group; q < (gi + 1) * out_per_group; ++q) {
      const bool on = gout == nullptr || gout[q];
      if (on != (pass == 0)) continue;
      for (int c = q * s.G; c < (q + 1) * s.G; ++c) out_list[z * Cog + count++] = c;
    }
    if (pass == 0) out_count[z] = count;
  }
}

// One thread per (sample, conv group).
__global__ void gate_lists_kernel(const bool* __restrict__ in_gates, const bool* __restrict__ out_gates, int64_t zs,
                                  GateListSizes s, int32_t* __restrict__ in_list, int32_t* __restrict__ in_count,
                                  int32_t* __restrict__ out_list, int32_t* __restrict__ out_count) {
  const int64_t z = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (z < zs) gate_lists_of(z, in_gates, out_gates, s, in_list, in_count, out_list, out_count);
}

struct GateLists {
  at::Tensor in_list, in_count, out_list, out_count;
};

GateLists empty_gate_lists(const ConvGeometry& g, const at::TensorOptions& opts) {
  const auto int_opts = opts.dtype(at::kInt).memory_format(at::MemoryFormat::Contiguous);
  const int64_t zs = g.N * g.groups;
  return GateLists{at::empty({zs, g.cin_g() / kVec}, int_opts), at::empty({zs}, int_opts),
                   at::empty({zs, g.cout_g()}, int_opts), at::empty({zs}, int_opts)};
}

GateListSizes sizes_of(const ConvGeometry& g) {
  return GateListSizes{static_cast<int>(g.Cin), static_cast<int>(g.Cout), static_cast<int>(g.groups),
                       static_cast<int>(g.G)};
}

template <class E>
struct ChannelConvProblem {
  using Elem = E;
  const E* x;     // (N, H, W, Cin)
  const E* w;     // (Cout, KH, KW, Cg)
  const E* bias;  // (Cout,) or null
  E* y;           // (N, Ho, Wo, Cout)
  const int32_t* in_list;
  const int32_t* in_count;
  const int32_t* out_list;
  const int32_t* out_count;
  int64_t H, W, Ho, Wo;
  int Cin, Cout, Cg, Cog, groups, KH, KW, SH, SW, PH, PW, DH, DW;  // Cg, Cog: channels per conv group
  bool relu;

  struct RowA {
    int64_t pixel0;
    int iy0, ix0;
  };
  struct KA {
    int dy, dx, tap_c;  // tap_c = tap * Cg + (c - the group's first channel): the offset in a weight row
    int c;              // the input channel
    int tap, kx, j;     // the tap, its column, the position in the pair's list of active input vectors
  };
  struct RowB {
    const E* w;
  };
  using KB = KA;

  CUTE_HOST_DEVICE int64_t rows(int) const { return Ho * Wo; }
  CUTE_HOST_DEVICE int cols(int) const { return Cog; }
  CUTE_HOST_DEVICE int active_cols(int z) const { return out_count[z]; }
  CUTE_HOST_DEVICE int kvecs(int z) const { return KH * KW * in_count[z]; }
  CUTE_HOST_DEVICE const E* any_src() const { return x; }

  CUTE_HOST_DEVICE RowA row_a(int z, int64_t m) const {
    const int64_t oy = m / Wo, ox = m - oy * Wo;
    return RowA{static_cast<int64_t>(z / groups) * H * W, static_cast<int>(oy * SH - PH),
                static_cast<int>(ox * SW - PW)};
  }
  // Only called with kvecs(z) > 0, so the group has an active input vector.
  CUTE_HOST_DEVICE KA k_a(int z, int kv) const {
    const int nin = in_count[z];
    const int tap = kv / nin, j = kv - tap * nin;
    const int c = in_list[static_cast<int64_t>(z) * (Cg / kVec) + j];
    return KA{(tap / KW) * DH, (tap % KW) * DW, tap * Cg + c - (z % groups) * Cg, c, tap, tap % KW, j};
  }
  // kVecsPerRow vectors on: the next active input vectors, wrapping into the next taps. Only called
  // while the state names a k vector that exists, so the list has an entry (nin >= 1).
  CUTE_HOST_DEVICE void step_k_a(int z, KA& k) const {
    const int nin = in_count[z];
    k.j += kVecsPerRow;
    while (k.j >= nin) {
      k.j -= nin;
      ++k.tap;
      next_tap(k.kx, k.dx, k.dy, KW, DW, DH);
    }
    k.c = in_list[static_cast<int64_t>(z) * (Cg / kVec) + k.j];
    k.tap_c = k.tap * Cg + k.c - (z % groups) * Cg;
  }
  CUTE_HOST_DEVICE const E* a_src(const RowA& r, const KA& k) const {
    const int iy = r.iy0 + k.dy, ix = r.ix0 + k.dx;
    if (iy < 0 || iy >= H || ix < 0 || ix >= W) return nullptr;
    return x + (r.pixel0 + static_cast<int64_t>(iy) * W + ix) * Cin + k.c;
  }
  CUTE_HOST_DEVICE RowB row_b(int z, int n) const {
    return RowB{w + static_cast<int64_t>(out_list[static_cast<int64_t>(z) * Cog + n]) * KH * KW * Cg};
  }
  CUTE_HOST_DEVICE KB k_b(int z, int kv) const { return k_a(z, kv); }
  CUTE_HOST_DEVICE void step_k_b(int z, KB& k) const { step_k_a(z, k); }
  CUTE_HOST_DEVICE const E* b_src(const RowB& r, const KB& k) const { return r.w + k.tap_c; }

  struct RowOut {
    E* y;  // the row's output pixel
  };
  CUTE_HOST_DEVICE RowOut row_out(int z, int64_t m) const {
    return RowOut{y + (static_cast<int64_t>(z / groups) * Ho * Wo + m) * Cout};
  }
  CUTE_HOST_DEVICE void store_row(const RowOut& r, int z, int n, float acc) const {
    const int co = out_list[static_cast<int64_t>(z) * Cog + n];
    float v = 0.f;
    if (n < out_count[z]) v = epilogue_activation(acc + (bias != nullptr ? float(bias[co]) : 0.f), relu);
    r.y[co] = E(v);
  }
};

template <class E, class Launch>
void run_channel_conv(at::Tensor& y, const at::Tensor& x, const at::Tensor& w_perm, const at::Tensor& bias,
                      const GateLists& lists, const ConvGeometry& g, Activation act, Launch&& launch) {
  ChannelConvProblem<E> p{cptr<E>(x), cptr<E>(w_perm), cptr<E>(bias), mptr<E>(y),
                          lists.in_list.data_ptr<int32_t>(), lists.in_count.data_ptr<int32_t>(),
                          lists.out_list.data_ptr<int32_t>(), lists.out_count.data_ptr<int32_t>(),
                          g.H, g.W, g.Ho, g.Wo,
                          static_cast<int>(g.Cin), static_cast<int>(g.Cout), static_cast<int>(g.cin_g()),
                          static_cast<int>(g.cout_g()), static_cast<int>(g.groups), static_cast<int>(g.KH),
                          static_cast<int>(g.KW), static_cast<int>(g.SH), static_cast<int>(g.SW),
                          static_cast<int>(g.PH), static_cast<int>(g.PW), static_cast<int>(g.DH),
                          static_cast<int>(g.DW), act == Activation::kRelu};
  launch(p, g.Ho * g.Wo, g.cout_g(), g.N * g.groups);
}

// Weight (Cout, Cg, KH, KW) -> (Cout, KH, KW, Cg): k = (ky, kx, c), the order the loaders walk.
at::Tensor taps_major(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

const bool* gates_ptr(const at::Tensor& gates) { return gates.defined() ? gates.data_ptr<bool>() : nullptr; }

// CPU emulation (tests): float32, channels_last result, group_size a multiple of 8.
at::Tensor channel_gated_conv2d_emulated(const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& in_gates,
                                         const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                         c10::IntArrayRef dilation, int64_t groups, c10::string_view activation) {
  const char* op = "_tensor_core_emulate_channel_gated_conv2d";
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, groups, op);
  check_emulation_input(x, op);
  TORCH_CHECK(g.G % kVec == 0, op, ": group_size must be a multiple of 8, got ", g.G);
  const Activation act = parse_activation(activation, op);
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast), w = taps_major(weight);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor gin = in_gates.has_value() ? in_gates->contiguous() : at::Tensor();
  const at::Tensor gout = out_gates.has_value() ? out_gates->contiguous() : at::Tensor();
  const GateLists lists = empty_gate_lists(g, x.options());
  for (int64_t z = 0; z < g.N * g.groups; ++z) {
    gate_lists_of(z, gates_ptr(gin), gates_ptr(gout), sizes_of(g), lists.in_list.data_ptr<int32_t>(),
                  lists.in_count.data_ptr<int32_t>(), lists.out_list.data_ptr<int32_t>(),
                  lists.out_count.data_ptr<int32_t>());
  }
  at::Tensor y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  run_channel_conv<float>(y, src, w, b, lists, g, act,
                          [](const auto& p, int64_t, int64_t, int64_t zs) { emulate_gather_gemm(p, zs); });
  return y;
}

}  // namespace
}  // namespace tc

bool tensor_core_channel_gated_conv2d(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& in_gates,
                                      const at::Tensor& out_gates, const ConvGeometry& g, Activation act) {
  if (!tc::switch_and_device_allow(x)) return false;
  // group_size divides the channels of each conv group (argument check), so with G % 8 == 0 the conv
  // groups are whole 16-byte vectors too.
  if (g.G % tc::kVec != 0) return false;
  if (g.groups != 1 && !experimental_kernels_enabled()) return false;
  if (g.N * g.groups > 65535) return false;  // one grid z per (sample, conv group)
  if (!tc::channels_last_map(x) || !tc::channels_last_map(y)) return false;
  if (y.numel() == 0) return true;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = tc::taps_major(weight);
  if (!tc::aligned16(w)) return false;  // a view of a caller's channels_last weight at an odd offset
  const tc::GateLists lists = tc::empty_gate_lists(g, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t zs = g.N * g.groups;
  tc::gate_lists_kernel<<<(zs + 127) / 128, 128, 0, stream>>>(
      tc::gates_ptr(in_gates), tc::gates_ptr(out_gates), zs, tc::sizes_of(g), lists.in_list.data_ptr<int32_t>(),
      lists.in_count.data_ptr<int32_t>(), lists.out_list.data_ptr<int32_t>(), lists.out_count.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tc::dispatch_elem(x.scalar_type(), [&](auto elem) {
    tc::run_channel_conv<decltype(elem)>(y, x, w, bias, lists, g, act,
                                         [&](const auto& p, int64_t rows, int64_t cols, int64_t zs) {
                                           tc::launch_gather_gemm(p, rows, cols, zs, stream);
                                         });
  });
  count_tensor_core_call();
  return true;
}

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("_tensor_core_emulate_channel_gated_conv2d", &tc::channel_gated_conv2d_emulated);
}

}  // namespace laudnet_ops
