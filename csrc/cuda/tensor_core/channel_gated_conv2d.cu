// Tensor-core channel_gated_conv2d: a grouped GEMM over samples (blockIdx.z = sample), each
// gathering its own active weight rows (output channels) and columns (input channels).
//
// RUN ON AN NVIDIA H200 (sm_90): tests/test_tensor_cores.py passes there against the reference
// (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. On where built (see
// tensor_core_switch.h).
//
// Per sample n: rows = its Ho*Wo output pixels; columns = its output channels, active ones first
// (out_list[n, :out_count[n]]), then the inactive ones, which get no loads and no MMA (whole
// inactive column tiles skip the K loop) and are written as exact zeros; K = taps x its active
// input channels, walked as 16-byte vectors listed in in_list[n, :in_count[n]]. The lists are
// built on the device from the gates. Eligible: groups == 1 and group_size % 8 == 0, so a gate
// group is whole 16-byte vectors (group_size 4 stays on the SIMT kernel).
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

// Sample n's active input vectors (channel offsets) and its output channels, active ones first.
CUTE_HOST_DEVICE void gate_lists_of_sample(int64_t n, const bool* in_gates, const bool* out_gates, int Cin, int Cout,
                                           int G, int32_t* in_list, int32_t* in_count, int32_t* out_list,
                                           int32_t* out_count) {
  const int in_groups = Cin / G, out_groups = Cout / G, cvecs = Cin / kVec;
  int count = 0;
  for (int gi = 0; gi < in_groups; ++gi) {
    if (in_gates != nullptr && !in_gates[n * in_groups + gi]) continue;
    for (int c = gi * G; c < (gi + 1) * G; c += kVec) in_list[n * cvecs + count++] = c;
  }
  in_count[n] = count;
  count = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int go = 0; go < out_groups; ++go) {
      const bool on = out_gates == nullptr || out_gates[n * out_groups + go];
      if (on != (pass == 0)) continue;
      for (int c = go * G; c < (go + 1) * G; ++c) out_list[n * Cout + count++] = c;
    }
    if (pass == 0) out_count[n] = count;
  }
}

// One thread per sample.
__global__ void gate_lists_kernel(const bool* __restrict__ in_gates, const bool* __restrict__ out_gates, int64_t N,
                                  int Cin, int Cout, int G, int32_t* __restrict__ in_list,
                                  int32_t* __restrict__ in_count, int32_t* __restrict__ out_list,
                                  int32_t* __restrict__ out_count) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n < N) gate_lists_of_sample(n, in_gates, out_gates, Cin, Cout, G, in_list, in_count, out_list, out_count);
}

struct GateLists {
  at::Tensor in_list, in_count, out_list, out_count;
};

GateLists empty_gate_lists(const ConvGeometry& g, const at::TensorOptions& opts) {
  const auto int_opts = opts.dtype(at::kInt).memory_format(at::MemoryFormat::Contiguous);
  return GateLists{at::empty({g.N, g.Cin / kVec}, int_opts), at::empty({g.N}, int_opts),
                   at::empty({g.N, g.Cout}, int_opts), at::empty({g.N}, int_opts)};
}

template <class E>
struct ChannelConvProblem {
  using Elem = E;
  const E* x;     // (N, H, W, Cin)
  const E* w;     // (Cout, KH, KW, Cin)
  const E* bias;  // (Cout,) or null
  E* y;           // (N, Ho, Wo, Cout)
  const int32_t* in_list;
  const int32_t* in_count;
  const int32_t* out_list;
  const int32_t* out_count;
  int64_t H, W, Ho, Wo;
  int Cin, Cout, KH, KW, SH, SW, PH, PW, DH, DW;
  bool relu;

  struct RowA {
    int64_t pixel0;
    int iy0, ix0;
  };
  struct KA {
    int dy, dx, tap_c;  // tap_c = tap * Cin + c: the offset in a weight row
    int c;
  };
  struct RowB {
    const E* w;
  };
  using KB = KA;

  CUTE_HOST_DEVICE int64_t rows(int) const { return Ho * Wo; }
  CUTE_HOST_DEVICE int cols(int) const { return Cout; }
  CUTE_HOST_DEVICE int active_cols(int z) const { return out_count[z]; }
  CUTE_HOST_DEVICE int kvecs(int z) const { return KH * KW * in_count[z]; }
  CUTE_HOST_DEVICE const E* any_src() const { return x; }

  CUTE_HOST_DEVICE RowA row_a(int z, int64_t m) const {
    const int64_t oy = m / Wo, ox = m - oy * Wo;
    return RowA{z * H * W, static_cast<int>(oy * SH - PH), static_cast<int>(ox * SW - PW)};
  }
  // Only called with kvecs(z) > 0, so the sample has an active input vector.
  CUTE_HOST_DEVICE KA k_a(int z, int kv) const {
    const int nin = in_count[z];
    const int tap = kv / nin;
    const int c = in_list[static_cast<int64_t>(z) * (Cin / kVec) + (kv - tap * nin)];
    return KA{(tap / KW) * DH, (tap % KW) * DW, tap * Cin + c, c};
  }
  CUTE_HOST_DEVICE const E* a_src(const RowA& r, const KA& k) const {
    const int iy = r.iy0 + k.dy, ix = r.ix0 + k.dx;
    if (iy < 0 || iy >= H || ix < 0 || ix >= W) return nullptr;
    return x + (r.pixel0 + static_cast<int64_t>(iy) * W + ix) * Cin + k.c;
  }
  CUTE_HOST_DEVICE RowB row_b(int z, int n) const {
    return RowB{w + static_cast<int64_t>(out_list[static_cast<int64_t>(z) * Cout + n]) * KH * KW * Cin};
  }
  CUTE_HOST_DEVICE KB k_b(int z, int kv) const { return k_a(z, kv); }
  CUTE_HOST_DEVICE const E* b_src(const RowB& r, const KB& k) const { return r.w + k.tap_c; }

  CUTE_HOST_DEVICE void store(int z, int64_t m, int n, float acc) const {
    const int co = out_list[static_cast<int64_t>(z) * Cout + n];
    float v = 0.f;
    if (n < out_count[z]) v = epilogue_activation(acc + (bias != nullptr ? float(bias[co]) : 0.f), relu);
    y[(z * Ho * Wo + m) * Cout + co] = E(v);
  }
};

template <class E, class Launch>
void run_channel_conv(at::Tensor& y, const at::Tensor& x, const at::Tensor& w_perm, const at::Tensor& bias,
                      const GateLists& lists, const ConvGeometry& g, Activation act, Launch&& launch) {
  ChannelConvProblem<E> p{cptr<E>(x), cptr<E>(w_perm), cptr<E>(bias), mptr<E>(y),
                          lists.in_list.data_ptr<int32_t>(), lists.in_count.data_ptr<int32_t>(),
                          lists.out_list.data_ptr<int32_t>(), lists.out_count.data_ptr<int32_t>(),
                          g.H, g.W, g.Ho, g.Wo,
                          static_cast<int>(g.Cin), static_cast<int>(g.Cout), static_cast<int>(g.KH),
                          static_cast<int>(g.KW), static_cast<int>(g.SH), static_cast<int>(g.SW),
                          static_cast<int>(g.PH), static_cast<int>(g.PW), static_cast<int>(g.DH),
                          static_cast<int>(g.DW), act == Activation::kRelu};
  launch(p, g.Ho * g.Wo, g.Cout, g.N);
}

// Weight (Cout, Cin, KH, KW) -> (Cout, KH, KW, Cin): k = (ky, kx, c), the order the loaders walk.
at::Tensor taps_major(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

const bool* gates_ptr(const at::Tensor& gates) { return gates.defined() ? gates.data_ptr<bool>() : nullptr; }

// CPU emulation (tests): float32, channels_last result, groups == 1, group_size % 8 == 0.
at::Tensor channel_gated_conv2d_emulated(const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& in_gates,
                                         const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                         c10::IntArrayRef dilation, c10::string_view activation) {
  const char* op = "_tensor_core_emulate_channel_gated_conv2d";
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, 1, op);
  check_emulation_input(x, op);
  TORCH_CHECK(g.G % kVec == 0, op, ": group_size must be a multiple of 8, got ", g.G);
  const Activation act = parse_activation(activation, op);
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast), w = taps_major(weight);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor gin = in_gates.has_value() ? in_gates->contiguous() : at::Tensor();
  const at::Tensor gout = out_gates.has_value() ? out_gates->contiguous() : at::Tensor();
  const GateLists lists = empty_gate_lists(g, x.options());
  for (int64_t n = 0; n < g.N; ++n) {
    gate_lists_of_sample(n, gates_ptr(gin), gates_ptr(gout), static_cast<int>(g.Cin), static_cast<int>(g.Cout),
                         static_cast<int>(g.G), lists.in_list.data_ptr<int32_t>(), lists.in_count.data_ptr<int32_t>(),
                         lists.out_list.data_ptr<int32_t>(), lists.out_count.data_ptr<int32_t>());
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
  if (g.groups != 1 || g.G % tc::kVec != 0 || g.N > 65535) return false;  // one grid z per sample
  if (!tc::channels_last_map(x) || !tc::channels_last_map(y)) return false;
  if (y.numel() == 0) return true;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = tc::taps_major(weight);
  if (!tc::aligned16(w)) return false;  // a view of a caller's channels_last weight at an odd offset
  const tc::GateLists lists = tc::empty_gate_lists(g, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  tc::gate_lists_kernel<<<(g.N + 127) / 128, 128, 0, stream>>>(
      tc::gates_ptr(in_gates), tc::gates_ptr(out_gates), g.N, static_cast<int>(g.Cin), static_cast<int>(g.Cout),
      static_cast<int>(g.G), lists.in_list.data_ptr<int32_t>(), lists.in_count.data_ptr<int32_t>(),
      lists.out_list.data_ptr<int32_t>(), lists.out_count.data_ptr<int32_t>());
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
