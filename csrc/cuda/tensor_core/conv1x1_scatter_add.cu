// Tensor-core epilogue fusion of a block's last 1x1 convolution on packed patches with the
// scatter-add into the residual: out = act(out + conv1x1(packed) + bias) at every position of
// an active patch inside the map, other positions untouched -- the conv's output never exists.
//
// RUN ON AN NVIDIA H200 (sm_90): tests/test_tensor_cores.py passes there against the reference
// (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. On where built (see
// tensor_core_switch.h).
//
// Rows m = (p, i, j) of the channels_last packed (P, S, S, Cin) are a plain dense GEMM operand;
// the gather is all in the epilogue, which reads the residual and writes the result in place.
// Unique patch rows (checked by the caller) make every output position belong to one thread.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../conv1x1_scatter.h"
#include "../patch_grid.cuh"
#include "../tensor_core.h"
#include "common.cuh"
#include "gather_gemm.cuh"

namespace laudnet_ops {
namespace tc {
namespace {

template <class E>
struct Conv1x1ScatterProblem {
  using Elem = E;
  const E* packed;  // (P*S*S, Cin)
  const E* w;       // (Cout, Cin)
  const E* bias;    // (Cout,) or null
  const int32_t* idx;
  E* out;           // (N, Ho, Wo, Cout), holds the residual
  int64_t P, Ho, Wo;
  int Cin, Cout, S;
  bool relu;

  struct RowA {
    const E* x;
  };
  struct KA {
    int offset;
  };
  using RowB = RowA;
  using KB = KA;

  CUTE_HOST_DEVICE int64_t rows(int) const { return P * S * S; }
  CUTE_HOST_DEVICE int cols(int) const { return Cout; }
  CUTE_HOST_DEVICE int active_cols(int) const { return Cout; }
  CUTE_HOST_DEVICE int kvecs(int) const { return Cin / kVec; }
  CUTE_HOST_DEVICE const E* any_src() const { return packed; }

  CUTE_HOST_DEVICE RowA row_a(int, int64_t m) const { return RowA{packed + m * Cin}; }
  CUTE_HOST_DEVICE KA k_a(int, int kv) const { return KA{kv * kVec}; }
  CUTE_HOST_DEVICE const E* a_src(const RowA& r, const KA& k) const { return r.x + k.offset; }
  CUTE_HOST_DEVICE RowB row_b(int, int n) const { return RowB{w + static_cast<int64_t>(n) * Cin}; }
  CUTE_HOST_DEVICE KB k_b(int, int kv) const { return KB{kv * kVec}; }
  CUTE_HOST_DEVICE void step_k_a(int, KA& k) const { k.offset += kVecsPerRow * kVec; }
  CUTE_HOST_DEVICE void step_k_b(int, KB& k) const { k.offset += kVecsPerRow * kVec; }
  CUTE_HOST_DEVICE const E* b_src(const RowB& r, const KB& k) const { return r.x + k.offset; }

  struct RowOut {
    E* o;  // the row's output pixel, or null for the part of a border patch outside the map
  };
  CUTE_HOST_DEVICE RowOut row_out(int, int64_t m) const {
    const int64_t p = m / (S * S);
    const int r = static_cast<int>(m - p * S * S);
    const int64_t oy = static_cast<int64_t>(idx[3 * p + 1]) * S + r / S;
    const int64_t ox = static_cast<int64_t>(idx[3 * p + 2]) * S + r % S;
    if (oy >= Ho || ox >= Wo) return RowOut{nullptr};
    return RowOut{out + ((idx[3 * p] * Ho + oy) * Wo + ox) * Cout};
  }
  CUTE_HOST_DEVICE void store_row(const RowOut& r, int, int n, float acc) const {
    if (r.o == nullptr) return;
    E* o = r.o + n;
    *o = E(epilogue_activation(float(*o) + acc + (bias != nullptr ? float(bias[n]) : 0.f), relu));
  }
};

template <class E, class Launch>
void run_conv1x1_scatter(at::Tensor& out, const at::Tensor& packed, const at::Tensor& idx, const at::Tensor& w,
                         const at::Tensor& bias, Activation act, Launch&& launch) {
  const int64_t P = idx.size(0), S = packed.size(2);
  Conv1x1ScatterProblem<E> p{cptr<E>(packed), cptr<E>(w), cptr<E>(bias), idx.data_ptr<int32_t>(), mptr<E>(out),
                             P, out.size(2), out.size(3), static_cast<int>(packed.size(1)),
                             static_cast<int>(out.size(1)), static_cast<int>(S), act == Activation::kRelu};
  launch(p, P * S * S, out.size(1), 1);
}

}  // namespace
}  // namespace tc

bool tensor_core_conv1x1_scatter_add(at::Tensor& out, const at::Tensor& packed, const at::Tensor& indices,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     Activation act) {
  if (!tc::switch_and_device_allow(out)) return false;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (packed.scalar_type() != out.scalar_type() || weight.scalar_type() != out.scalar_type() ||
      (b.defined() && b.scalar_type() != out.scalar_type())) {
    return false;
  }
  const int64_t Cin = packed.size(1), Cout = out.size(1), S = packed.size(2);
  if (Cin % tc::kVec != 0 || !tc::channels_last_map(packed) || !tc::channels_last_map(out)) return false;
  if (indices.size(0) == 0 || Cout == 0) return true;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor w = weight.reshape({Cout, Cin}).contiguous();
  if (!tc::aligned16(w)) return false;  // a view of a caller's weight at an odd offset
  const at::Tensor idx = indices.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  tc::dispatch_elem(out.scalar_type(), [&](auto elem) {
    tc::run_conv1x1_scatter<decltype(elem)>(out, packed, idx, w, b, act,
                                            [&](const auto& p, int64_t rows, int64_t cols, int64_t zs) {
                                              tc::launch_gather_gemm(p, rows, cols, zs, stream);
                                            });
  });
  count_tensor_core_call();
  return true;
}

namespace {

// Test access to the entry point until the public conv1x1_scatter_add op dispatches to it; the
// indices are validated on the device.
bool conv1x1_scatter_add_tc_op(at::Tensor& out, const at::Tensor& packed, const at::Tensor& indices,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               c10::string_view activation) {
  const char* op = "_tensor_core_conv1x1_scatter_add_";
  const Activation act = parse_activation(activation, op);
  // The public op's checks (out is its residual): they keep the kernel inside its tensors.
  const PatchGeometry g = check_conv1x1_scatter_args(out, packed, indices, weight, bias, op).out;
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::validate_rows(indices.contiguous(), g, /*want_grid=*/false, op);
  return tensor_core_conv1x1_scatter_add(out, packed, indices, weight, bias, act);
}

// CPU emulation (tests): float32 out and packed, in place, with the kernel's index math.
void conv1x1_scatter_add_emulated(at::Tensor& out, const at::Tensor& packed, const at::Tensor& indices,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  c10::string_view activation) {
  const char* op = "_tensor_core_emulate_conv1x1_scatter_add_";
  const Activation act = parse_activation(activation, op);
  // The public op's checks (out is its residual): they keep the kernel inside its tensors.
  const PatchGeometry g = check_conv1x1_scatter_args(out, packed, indices, weight, bias, op).out;
  tc::check_emulation_input(out, op);
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": out must be channels_last");
  TORCH_CHECK(packed.size(1) % tc::kVec == 0, op, ": Cin must be a multiple of 8, got ", packed.size(1));
  const at::Tensor idx = indices.contiguous();
  tc::check_rows_in_grid(idx, g.N, g.Hp, g.Wp, op);
  const at::Tensor src = packed.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.reshape({out.size(1), packed.size(1)}).contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  tc::run_conv1x1_scatter<float>(out, src, idx, w, b, act, [](const auto& p, int64_t, int64_t, int64_t zs) {
    tc::emulate_gather_gemm(p, zs);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) {
  m.impl("_tensor_core_conv1x1_scatter_add_", &conv1x1_scatter_add_tc_op);
}

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("_tensor_core_emulate_conv1x1_scatter_add_", &conv1x1_scatter_add_emulated);
}

}  // namespace laudnet_ops
