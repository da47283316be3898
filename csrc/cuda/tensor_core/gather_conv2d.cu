// Tensor-core gather_conv2d: an implicit GEMM whose A loader gathers each active patch's halo
// straight from the dense channels_last map.
//
// RUN ON AN NVIDIA H200 (sm_90): tests/test_tensor_cores.py passes there against the reference
// (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. On where built (see
// tensor_core_switch.h).
//
// Rows m = (p, i, j) are the P*S*S positions of packed; k = (kh, kw, c) runs over the taps and
// input channels, matching the weight permuted to (Cout, K, K, Cin). A vector of 8 channels of
// one tap is zero where its input pixel lies in the padding, or where (i, j) of a border patch
// lies outside the output map (those positions of packed are written as zeros, as the contract
// says).
//
// A grouped convolution is one GEMM per group, z = group: the group's Cg input channels form k, its
// Cog output channels the columns. EXPERIMENTAL (groups > 1 only): its index math passes the CPU
// emulation tests, but it has not run on a GPU, so grouped calls take it only with the experimental
// switch on (tensor_core_switch.h). With groups == 1, z is 0 and every group offset below is zero.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tensor_core.h"
#include "common.cuh"
#include "gather_gemm.cuh"

namespace laudnet_ops {
namespace tc {
namespace {

template <class E>
struct GatherConvProblem {
  using Elem = E;
  const E* x;        // (N, H, W, Cin)
  const E* w;        // (Cout, K, K, Cin)
  const E* bias;     // (Cout,) or null
  const int32_t* idx;
  E* out;            // (P, S, S, Cout)
  int64_t H, W, Ho, Wo, P;
  int Cin, Cout, Cg, Cog, K, S, stride, padding, dilation;  // Cg, Cog: channels per group
  bool relu;

  struct RowA {
    int64_t pixel0;  // n * H * W: the first pixel of the row's sample
    int iy0, ix0;    // input pixel of tap (0, 0)
    bool inside;     // the output position lies inside the map
  };
  struct KA {
    int dy, dx, c;
    int kx;  // the tap's column, for stepping
  };
  struct RowB {
    const E* w;
  };
  struct KB {
    int offset;
  };

  CUTE_HOST_DEVICE int64_t rows(int) const { return P * S * S; }
  CUTE_HOST_DEVICE int cols(int) const { return Cog; }
  CUTE_HOST_DEVICE int active_cols(int) const { return Cog; }
  CUTE_HOST_DEVICE int kvecs(int) const { return K * K * (Cg / kVec); }
  CUTE_HOST_DEVICE const E* any_src() const { return x; }

  // Output position (n, oy, ox) of row m; inside is false past the map's bottom or right border.
  CUTE_HOST_DEVICE void position(int64_t m, int64_t& n, int64_t& oy, int64_t& ox) const {
    const int64_t p = m / (S * S);
    const int r = static_cast<int>(m - p * S * S);
    n = idx[3 * p];
    oy = static_cast<int64_t>(idx[3 * p + 1]) * S + r / S;
    ox = static_cast<int64_t>(idx[3 * p + 2]) * S + r % S;
  }

  CUTE_HOST_DEVICE RowA row_a(int, int64_t m) const {
    int64_t n, oy, ox;
    position(m, n, oy, ox);
    return RowA{n * H * W, static_cast<int>(oy * stride - padding), static_cast<int>(ox * stride - padding),
                oy < Ho && ox < Wo};
  }
  CUTE_HOST_DEVICE KA k_a(int z, int kv) const {
    const int cvecs = Cg / kVec;
    const int tap = kv / cvecs;
    return KA{(tap / K) * dilation, (tap % K) * dilation, z * Cg + (kv - tap * cvecs) * kVec, tap % K};
  }
  // kVecsPerRow vectors on: the group's next channels, wrapping into the next taps.
  CUTE_HOST_DEVICE void step_k_a(int z, KA& k) const {
    k.c += kVecsPerRow * kVec;
    while (k.c >= (z + 1) * Cg) {
      k.c -= Cg;
      next_tap(k.kx, k.dx, k.dy, K, dilation, dilation);
    }
  }
  CUTE_HOST_DEVICE const E* a_src(const RowA& r, const KA& k) const {
    const int iy = r.iy0 + k.dy, ix = r.ix0 + k.dx;
    if (!r.inside || iy < 0 || iy >= H || ix < 0 || ix >= W) return nullptr;
    return x + (r.pixel0 + static_cast<int64_t>(iy) * W + ix) * Cin + k.c;
  }
  CUTE_HOST_DEVICE RowB row_b(int z, int n) const {
    return RowB{w + static_cast<int64_t>(z * Cog + n) * K * K * Cg};
  }
  CUTE_HOST_DEVICE KB k_b(int, int kv) const { return KB{kv * kVec}; }
  CUTE_HOST_DEVICE void step_k_b(int, KB& k) const { k.offset += kVecsPerRow * kVec; }
  CUTE_HOST_DEVICE const E* b_src(const RowB& r, const KB& k) const { return r.w + k.offset; }

  struct RowOut {
    E* out;       // the row's first output, at the group's first channel
    const E* b;   // the group's bias, or null
    bool inside;  // the output position lies inside the map (else its outputs are zeros)
  };
  CUTE_HOST_DEVICE RowOut row_out(int z, int64_t m) const {
    int64_t nn, oy, ox;
    position(m, nn, oy, ox);
    return RowOut{out + m * Cout + z * Cog, bias != nullptr ? bias + z * Cog : nullptr, oy < Ho && ox < Wo};
  }
  CUTE_HOST_DEVICE void store_row(const RowOut& r, int, int n, float acc) const {
    const float v = r.inside ? epilogue_activation(acc + (r.b != nullptr ? float(r.b[n]) : 0.f), relu) : 0.f;
    r.out[n] = E(v);
  }
};

// Builds the problem from prepared tensors and hands it to launch (the GPU kernel or the CPU emulation).
template <class E, class Launch>
void run_gather_conv(at::Tensor& packed, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w_perm,
                     const at::Tensor& bias, const GatherConvGeometry& g, Activation act, Launch&& launch) {
  GatherConvProblem<E> p{cptr<E>(x), cptr<E>(w_perm), cptr<E>(bias), idx.data_ptr<int32_t>(), mptr<E>(packed),
                         g.H, g.W, g.Ho, g.Wo, g.P,
                         static_cast<int>(g.Cin), static_cast<int>(g.Cout), static_cast<int>(g.Cg),
                         static_cast<int>(g.Cog), static_cast<int>(g.K), static_cast<int>(g.S),
                         static_cast<int>(g.stride), static_cast<int>(g.padding), static_cast<int>(g.dilation),
                         act == Activation::kRelu};
  launch(p, g.P * g.S * g.S, g.Cog, g.groups);
}

// Weight (Cout, Cg, K, K) -> (Cout, K, K, Cg): k = (kh, kw, c), the order the A loader walks.
at::Tensor taps_major(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

// CPU emulation (tests): float32, channels_last result.
at::Tensor gather_conv2d_emulated(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t patch_size, int64_t stride,
                                  int64_t padding, int64_t dilation, int64_t groups,
                                  c10::string_view activation) {
  const char* op = "_tensor_core_emulate_gather_conv2d";
  const GatherConvGeometry g =
      check_gather_conv_args(x, indices, weight, bias, patch_size, stride, padding, dilation, groups, op);
  check_emulation_input(x, op);
  TORCH_CHECK(g.Cg % kVec == 0, op, ": input channels per group must be a multiple of 8, got ", g.Cg);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  check_rows_in_grid(idx, g.N, g.Hp, g.Wp, op);
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast), w = taps_major(weight);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor packed = at::empty({g.P, g.Cout, g.S, g.S}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  run_gather_conv<float>(packed, src, idx, w, b, g, act,
                         [](const auto& p, int64_t, int64_t, int64_t zs) { emulate_gather_gemm(p, zs); });
  return packed;
}

}  // namespace
}  // namespace tc

bool tensor_core_gather_conv2d(at::Tensor& packed, const at::Tensor& x, const at::Tensor& indices,
                               const at::Tensor& weight, const at::Tensor& bias, const GatherConvGeometry& g,
                               Activation act) {
  if (!tc::switch_and_device_allow(x)) return false;
  if (g.Cg % tc::kVec != 0) return false;
  if (g.groups != 1 && !experimental_kernels_enabled()) return false;
  if (g.groups > 65535) return false;  // one grid z per group
  if (!tc::channels_last_map(x) || !tc::channels_last_map(packed)) return false;
  if (g.P == 0 || g.Cout == 0) return true;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = tc::taps_major(weight);
  if (!tc::aligned16(w)) return false;  // a view of a caller's channels_last weight at an odd offset
  const at::Tensor idx = indices.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  tc::dispatch_elem(x.scalar_type(), [&](auto elem) {
    tc::run_gather_conv<decltype(elem)>(packed, x, idx, w, bias, g, act,
                                        [&](const auto& p, int64_t rows, int64_t cols, int64_t zs) {
                                          tc::launch_gather_gemm(p, rows, cols, zs, stream);
                                        });
  });
  count_tensor_core_call();
  return true;
}

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("_tensor_core_emulate_gather_conv2d", &tc::gather_conv2d_emulated);
}

namespace {
// This translation unit exists only in builds with the tensor-core kernels.
const bool kMarkedBuilt = (mark_tensor_cores_built(), true);
}  // namespace

}  // namespace laudnet_ops
