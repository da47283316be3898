// Tensor-core channel_gated_conv2d: a grouped GEMM over samples (blockIdx.z = sample), each
// gathering its own active weight rows (output channels) and columns (input channels).
//
// NOT YET RUN ON A GPU: compiled for sm_80 and sm_90 only; off by default (see
// tensor_core_switch.h); tests/test_tensor_cores.py validates it on a GPU machine.
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

#include "../tensor_core.h"
#include "common.cuh"
#include "gather_gemm.cuh"

namespace laudnet_ops {
namespace tc {
namespace {

// One thread per sample: the active input vectors and the output channels (active first).
__global__ void gate_lists_kernel(const bool* __restrict__ in_gates, const bool* __restrict__ out_gates, int64_t N,
                                  int Cin, int Cout, int G, int32_t* __restrict__ in_list,
                                  int32_t* __restrict__ in_count, int32_t* __restrict__ out_list,
                                  int32_t* __restrict__ out_count) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
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

  __device__ int64_t rows(int) const { return Ho * Wo; }
  __device__ int cols(int) const { return Cout; }
  __device__ int active_cols(int z) const { return out_count[z]; }
  __device__ int kvecs(int z) const { return KH * KW * in_count[z]; }
  __device__ const E* any_src() const { return x; }

  __device__ RowA row_a(int z, int64_t m) const {
    const int64_t oy = m / Wo, ox = m - oy * Wo;
    return RowA{z * H * W, static_cast<int>(oy * SH - PH), static_cast<int>(ox * SW - PW)};
  }
  // Only called with kvecs(z) > 0, so the sample has an active input vector.
  __device__ KA k_a(int z, int kv) const {
    const int nin = in_count[z];
    const int tap = kv / nin;
    const int c = in_list[static_cast<int64_t>(z) * (Cin / kVec) + (kv - tap * nin)];
    return KA{(tap / KW) * DH, (tap % KW) * DW, tap * Cin + c, c};
  }
  __device__ const E* a_src(const RowA& r, const KA& k) const {
    const int iy = r.iy0 + k.dy, ix = r.ix0 + k.dx;
    if (iy < 0 || iy >= H || ix < 0 || ix >= W) return nullptr;
    return x + (r.pixel0 + static_cast<int64_t>(iy) * W + ix) * Cin + k.c;
  }
  __device__ RowB row_b(int z, int n) const {
    return RowB{w + static_cast<int64_t>(out_list[static_cast<int64_t>(z) * Cout + n]) * KH * KW * Cin};
  }
  __device__ KB k_b(int z, int kv) const { return k_a(z, kv); }
  __device__ const E* b_src(const RowB& r, const KB& k) const { return r.w + k.tap_c; }

  __device__ void store(int z, int64_t m, int n, float acc) const {
    const int co = out_list[static_cast<int64_t>(z) * Cout + n];
    float v = 0.f;
    if (n < out_count[z]) v = epilogue_activation(acc + (bias != nullptr ? float(bias[co]) : 0.f), relu);
    y[(z * Ho * Wo + m) * Cout + co] = E(v);
  }
};

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
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // k = (ky, kx, c)
  if (!tc::aligned16(w)) return false;  // a view of a caller's channels_last weight at an odd offset
  const auto int_opts = x.options().dtype(at::kInt);
  at::Tensor in_list = at::empty({g.N, g.Cin / tc::kVec}, int_opts), in_count = at::empty({g.N}, int_opts);
  at::Tensor out_list = at::empty({g.N, g.Cout}, int_opts), out_count = at::empty({g.N}, int_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  tc::gate_lists_kernel<<<(g.N + 127) / 128, 128, 0, stream>>>(
      in_gates.defined() ? in_gates.data_ptr<bool>() : nullptr,
      out_gates.defined() ? out_gates.data_ptr<bool>() : nullptr, g.N, static_cast<int>(g.Cin),
      static_cast<int>(g.Cout), static_cast<int>(g.G), in_list.data_ptr<int32_t>(), in_count.data_ptr<int32_t>(),
      out_list.data_ptr<int32_t>(), out_count.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tc::dispatch_elem(x.scalar_type(), [&](auto elem) {
    using E = decltype(elem);
    tc::ChannelConvProblem<E> p{tc::cptr<E>(x), tc::cptr<E>(w), tc::cptr<E>(bias), tc::mptr<E>(y),
                                in_list.data_ptr<int32_t>(), in_count.data_ptr<int32_t>(),
                                out_list.data_ptr<int32_t>(), out_count.data_ptr<int32_t>(),
                                g.H, g.W, g.Ho, g.Wo,
                                static_cast<int>(g.Cin), static_cast<int>(g.Cout), static_cast<int>(g.KH),
                                static_cast<int>(g.KW), static_cast<int>(g.SH), static_cast<int>(g.SW),
                                static_cast<int>(g.PH), static_cast<int>(g.PW), static_cast<int>(g.DH),
                                static_cast<int>(g.DW), act == Activation::kRelu};
    tc::launch_gather_gemm(p, g.Ho * g.Wo, g.Cout, g.N, stream);
  });
  count_tensor_core_call();
  return true;
}

}  // namespace laudnet_ops
