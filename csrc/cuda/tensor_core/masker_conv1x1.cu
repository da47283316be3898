// Tensor-core masker_conv1x1: one GEMM over all N*H*W pixels of the channels_last x with the M
// masker channels appended to the weight, so x is read once for both outputs.
//
// NOT YET RUN ON A GPU: compiled for sm_80 and sm_90 only; off by default (see
// tensor_core_switch.h); tests/test_tensor_cores.py validates it on a GPU machine.
//
// Epilogue: columns n < Cout get bias and the activation and go to y; masker columns get
// mask_bias and are pooled to their mask cell: value / (cell's clipped pixel count) is
// atomically added to the float32 logits buffer the op casts at the end (so, like the SIMT
// kernel, logits may differ from run to run in the last bits).
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <c10/cuda/CUDAGuard.h>

#include "../tensor_core.h"
#include "common.cuh"
#include "gather_gemm.cuh"

namespace laudnet_ops {
namespace tc {
namespace {

template <class E>
struct MaskerProblem {
  using Elem = E;
  const E* x;          // (N*H*W, Cin)
  const E* w;          // (Cout + M, Cin): weight, then mask_weight
  const E* bias;       // (Cout,) or null
  const E* mask_bias;  // (M,) or null
  E* y;                // (N*H*W, Cout)
  float* sums;         // (N, M, Hq, Wq) with the strides below
  int64_t sn, sm, sy, sx;
  MaskerGeometry g;
  bool relu;

  struct RowA {
    const E* x;
  };
  struct KA {
    int offset;
  };
  using RowB = RowA;
  using KB = KA;

  __device__ int64_t rows(int) const { return g.N * g.H * g.W; }
  __device__ int cols(int) const { return static_cast<int>(g.Cout + g.M); }
  __device__ int active_cols(int) const { return static_cast<int>(g.Cout + g.M); }
  __device__ int kvecs(int) const { return static_cast<int>(g.Cin / kVec); }
  __device__ const E* any_src() const { return x; }

  __device__ RowA row_a(int, int64_t m) const { return RowA{x + m * g.Cin}; }
  __device__ KA k_a(int, int kv) const { return KA{kv * kVec}; }
  __device__ const E* a_src(const RowA& r, const KA& k) const { return r.x + k.offset; }
  __device__ RowB row_b(int, int n) const { return RowB{w + static_cast<int64_t>(n) * g.Cin}; }
  __device__ KB k_b(int, int kv) const { return KB{kv * kVec}; }
  __device__ const E* b_src(const RowB& r, const KB& k) const { return r.x + k.offset; }

  __device__ void store(int, int64_t m, int n, float acc) const {
    if (n < g.Cout) {
      y[m * g.Cout + n] = E(epilogue_activation(acc + (bias != nullptr ? float(bias[n]) : 0.f), relu));
      return;
    }
    const int64_t mc = n - g.Cout, HW = g.H * g.W;
    const int64_t img = m / HW, hw = m - img * HW;
    const int64_t qy = (hw / g.W) / g.window, qx = (hw % g.W) / g.window;
    const float value = acc + (mask_bias != nullptr ? float(mask_bias[mc]) : 0.f);
    const float area = static_cast<float>(g.cell_rows(qy) * g.cell_cols(qx));
    gpuAtomicAdd(&sums[img * sn + mc * sm + qy * sy + qx * sx], value / area);
  }
};

}  // namespace
}  // namespace tc

bool tensor_core_masker_conv1x1(at::Tensor& y, at::Tensor& sums, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& mask_weight,
                                const at::Tensor& mask_bias, const MaskerGeometry& g, Activation act) {
  if (!tc::switch_and_device_allow(x)) return false;
  if (g.Cin % tc::kVec != 0 || sums.scalar_type() != at::kFloat) return false;
  if (!tc::channels_last_map(x) || !y.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  if (g.N * g.H * g.W == 0) return true;
  const c10::cuda::CUDAGuard guard(x.device());
  // (Cout + M, Cin): a fresh contiguous tensor, so 16-byte aligned rows when Cin % 8 == 0.
  const at::Tensor w = at::cat({weight.reshape({g.Cout, g.Cin}), mask_weight.reshape({g.M, g.Cin})}, 0).contiguous();
  tc::dispatch_elem(x.scalar_type(), [&](auto elem) {
    using E = decltype(elem);
    tc::MaskerProblem<E> p{tc::cptr<E>(x), tc::cptr<E>(w), tc::cptr<E>(bias), tc::cptr<E>(mask_bias),
                           tc::mptr<E>(y), sums.data_ptr<float>(), sums.stride(0), sums.stride(1),
                           sums.stride(2), sums.stride(3), g, act == Activation::kRelu};
    tc::launch_gather_gemm(p, g.N * g.H * g.W, g.Cout + g.M, 1, at::cuda::getCurrentCUDAStream());
  });
  count_tensor_core_call();
  return true;
}

}  // namespace laudnet_ops
