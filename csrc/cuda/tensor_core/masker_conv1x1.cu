// Tensor-core masker_conv1x1: one GEMM over all N*H*W pixels of the channels_last x with the M
// masker channels appended to the weight, so x is read once for both outputs.
//
// RUN ON AN NVIDIA H200 (sm_90): tests/test_tensor_cores.py passes there against the reference
// (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. On where built (see
// tensor_core_switch.h).
//
// Epilogue: columns n < Cout get bias and the activation and go to y; masker columns get
// mask_bias and are pooled to their mask cell: value / (cell's clipped pixel count) is
// atomically added to the float32 logits buffer the op casts at the end (so, like the SIMT
// kernel, logits may differ from run to run in the last bits).
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

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

  CUTE_HOST_DEVICE int64_t rows(int) const { return g.N * g.H * g.W; }
  CUTE_HOST_DEVICE int cols(int) const { return static_cast<int>(g.Cout + g.M); }
  CUTE_HOST_DEVICE int active_cols(int) const { return static_cast<int>(g.Cout + g.M); }
  CUTE_HOST_DEVICE int kvecs(int) const { return static_cast<int>(g.Cin / kVec); }
  CUTE_HOST_DEVICE const E* any_src() const { return x; }

  CUTE_HOST_DEVICE RowA row_a(int, int64_t m) const { return RowA{x + m * g.Cin}; }
  CUTE_HOST_DEVICE KA k_a(int, int kv) const { return KA{kv * kVec}; }
  CUTE_HOST_DEVICE const E* a_src(const RowA& r, const KA& k) const { return r.x + k.offset; }
  CUTE_HOST_DEVICE RowB row_b(int, int n) const { return RowB{w + static_cast<int64_t>(n) * g.Cin}; }
  CUTE_HOST_DEVICE KB k_b(int, int kv) const { return KB{kv * kVec}; }
  CUTE_HOST_DEVICE void step_k_a(int, KA& k) const { k.offset += kVecsPerRow * kVec; }
  CUTE_HOST_DEVICE void step_k_b(int, KB& k) const { k.offset += kVecsPerRow * kVec; }
  CUTE_HOST_DEVICE const E* b_src(const RowB& r, const KB& k) const { return r.x + k.offset; }

  struct RowOut {
    E* y;         // the row's features
    float* cell;  // its mask cell's sum of masker channel 0
    float area;   // the cell's pixel count
  };
  CUTE_HOST_DEVICE RowOut row_out(int, int64_t m) const {
    const int64_t HW = g.H * g.W;
    const int64_t img = m / HW, hw = m - img * HW;
    const int64_t qy = (hw / g.W) / g.window, qx = (hw % g.W) / g.window;
    return RowOut{y + m * g.Cout, &sums[img * sn + qy * sy + qx * sx],
                  static_cast<float>(g.cell_rows(qy) * g.cell_cols(qx))};
  }
  CUTE_HOST_DEVICE void store_row(const RowOut& r, int, int n, float acc) const {
    if (n < g.Cout) {
      r.y[n] = E(epilogue_activation(acc + (bias != nullptr ? float(bias[n]) : 0.f), relu));
      return;
    }
    const int64_t mc = n - g.Cout;
    const float value = acc + (mask_bias != nullptr ? float(mask_bias[mc]) : 0.f);
#if defined(__CUDA_ARCH__)
    gpuAtomicAdd(r.cell + mc * sm, value / r.area);
#else
    r.cell[mc * sm] += value / r.area;
#endif
  }
};

// Weight then masker weight as one (Cout + M, Cin) matrix: a fresh tensor, 16-byte aligned rows.
at::Tensor stacked_weight(const at::Tensor& weight, const at::Tensor& mask_weight, const MaskerGeometry& g) {
  return at::cat({weight.reshape({g.Cout, g.Cin}), mask_weight.reshape({g.M, g.Cin})}, 0).contiguous();
}

template <class E, class Launch>
void run_masker(at::Tensor& y, at::Tensor& sums, const at::Tensor& x, const at::Tensor& w_stacked,
                const at::Tensor& bias, const at::Tensor& mask_bias, const MaskerGeometry& g, Activation act,
                Launch&& launch) {
  MaskerProblem<E> p{cptr<E>(x), cptr<E>(w_stacked), cptr<E>(bias), cptr<E>(mask_bias), mptr<E>(y),
                     sums.data_ptr<float>(), sums.stride(0), sums.stride(1), sums.stride(2), sums.stride(3),
                     g, act == Activation::kRelu};
  launch(p, g.N * g.H * g.W, g.Cout + g.M, 1);
}

// CPU emulation (tests): float32, channels_last results.
std::tuple<at::Tensor, at::Tensor> masker_conv1x1_emulated(const at::Tensor& x, const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const at::Tensor& mask_weight,
                                                           const c10::optional<at::Tensor>& mask_bias,
                                                           int64_t patch_size, int64_t stride,
                                                           c10::string_view activation) {
  const char* op = "_tensor_core_emulate_masker_conv1x1";
  const MaskerGeometry g = check_masker_args(x, weight, bias, mask_weight, mask_bias, patch_size, stride, op);
  check_emulation_input(x, op);
  TORCH_CHECK(g.Cin % kVec == 0, op, ": Cin must be a multiple of 8, got ", g.Cin);
  const Activation act = parse_activation(activation, op);
  const auto opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast), w = stacked_weight(weight, mask_weight, g);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bias.has_value() && mask_bias->defined() ? mask_bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.N, g.Cout, g.H, g.W}, opts);
  at::Tensor sums = at::empty({g.N, g.M, g.Hq, g.Wq}, opts).zero_();  // at::zeros would drop the layout
  run_masker<float>(y, sums, src, w, b, mb, g, act,
                    [](const auto& p, int64_t, int64_t, int64_t zs) { emulate_gather_gemm(p, zs); });
  return {y, sums};
}

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
  const at::Tensor w = tc::stacked_weight(weight, mask_weight, g);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  tc::dispatch_elem(x.scalar_type(), [&](auto elem) {
    tc::run_masker<decltype(elem)>(y, sums, x, w, bias, mask_bias, g, act,
                                   [&](const auto& p, int64_t rows, int64_t cols, int64_t zs) {
                                     tc::launch_gather_gemm(p, rows, cols, zs, stream);
                                   });
  });
  count_tensor_core_call();
  return true;
}

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("_tensor_core_emulate_masker_conv1x1", &tc::masker_conv1x1_emulated);
}

}  // namespace laudnet_ops
