// CUDA kernel of masker_conv1x1.
//
// Run on an NVIDIA H200 (sm_90): the CUDA cases of tests/test_masker_conv1x1.py
// pass there (benchmarks/results/gpu-NVIDIA-H200-*.md). Correct but slow -- far
// slower than cuDNN's dense conv; eligible calls take the tensor-core kernel.
//
// One launch over (pixel, channel) for the Cout + M output channels, so x is
// read in one pass: a thread of channel co < Cout writes y; a thread of a
// masker channel adds (w_m . x + b_m) / area into its mask cell with an atomic
// add into a float (double for float64) accumulator. Threads are ordered like
// x's memory (channel fastest in channels_last, pixel fastest in NCHW) so
// neighbouring threads share or coalesce their x reads. The order of the
// atomic adds varies, so logits may differ from run to run in the last bits.
// Eligible half/bfloat16 channels_last calls take the tensor-core kernel instead
// when it is switched on (tensor_core.h); with the experimental switch on, the
// others take two cuDNN convolutions and a pooling (conv1x1_composites.cpp), which
// have not run on a GPU yet.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../activation.h"
#include "../conv1x1_composites.h"
#include "../cudnn_composites.h"
#include "../tensor_core_switch.h"
#include "../spatial_conv.h"
#include "launch.cuh"
#include "tensor_core.h"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

struct LogitStrides {
  int64_t n, m, y, x;
};

template <typename scalar_t, Activation A, bool kChannelsLast>
__global__ void masker_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                              const scalar_t* __restrict__ bias, const scalar_t* __restrict__ wm,
                              const scalar_t* __restrict__ mask_bias, scalar_t* __restrict__ y,
                              at::opmath_type<scalar_t>* __restrict__ sums, LogitStrides ls, MaskerGeometry g,
                              int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t CT = g.Cout + g.M, HW = g.H * g.W;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, ch, hw;
    if (kChannelsLast) {
      ch = k % CT;
      hw = (k / CT) % HW;
      n = k / (CT * HW);
    } else {
      hw = k % HW;
      ch = (k / HW) % CT;
      n = k / (HW * CT);
    }
    const bool is_mask = ch >= g.Cout;
    const scalar_t* wrow = is_mask ? wm + (ch - g.Cout) * g.Cin : w + ch * g.Cin;
    acc_t acc = 0;
    if (kChannelsLast) {
      const scalar_t* xp = x + (n * HW + hw) * g.Cin;
      for (int64_t c = 0; c < g.Cin; ++c) acc += acc_t(xp[c]) * acc_t(wrow[c]);
    } else {
      const scalar_t* xp = x + n * g.Cin * HW + hw;
      for (int64_t c = 0; c < g.Cin; ++c) acc += acc_t(xp[c * HW]) * acc_t(wrow[c]);
    }
    if (!is_mask) {
      if (bias != nullptr) acc += acc_t(bias[ch]);
      y[kChannelsLast ? (n * HW + hw) * g.Cout + ch : (n * g.Cout + ch) * HW + hw] = activate<A>(acc);
    } else {
      const int64_t m = ch - g.Cout, h = hw / g.W, wx = hw % g.W;
      const int64_t qy = h / g.window, qx = wx / g.window;
      if (mask_bias != nullptr) acc += acc_t(mask_bias[m]);
      const acc_t area = acc_t(g.cell_rows(qy) * g.cell_cols(qx));
      gpuAtomicAdd(&sums[n * ls.n + m * ls.m + qy * ls.y + qx * ls.x], acc / area);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> masker_conv1x1_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias,
                                                       const at::Tensor& mask_weight,
                                                       const c10::optional<at::Tensor>& mask_bias,
                                                       int64_t patch_size, int64_t stride,
                                                       c10::string_view activation) {
  const char* op = "masker_conv1x1";
  const MaskerGeometry g = check_masker_args(x, weight, bias, mask_weight, mask_bias, patch_size, stride, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat layout = feature_layout(x);
  const auto opts = x.options().memory_format(layout);
  const at::Tensor src = x.contiguous(layout), w = weight.contiguous(), wm = mask_weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bias.has_value() && mask_bias->defined() ? mask_bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.N, g.Cout, g.H, g.W}, opts);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  // at::zeros drops the memory format of its options: the logits follow x's layout only through empty.
  at::Tensor sums = at::empty({g.N, g.M, g.Hq, g.Wq}, opts.dtype(acc_type)).zero_();
  const int64_t total = g.N * g.H * g.W * (g.Cout + g.M);
  if (total == 0) return {y, sums.to(x.scalar_type())};
  // Experimental (not yet run on a GPU): two cuDNN 1x1 convolutions and a pooling, for every call when
  // the composites are switched on, else for the calls the tensor cores decline, instead of the kernel below.
  if (cudnn_composites_enabled()) return masker_conv1x1_by_dense_conv(src, w, b, wm, mb, g, act);
  if (tensor_core_masker_conv1x1(y, sums, src, w, b, wm, mb, g, act)) return {y, sums.to(x.scalar_type())};
  if (experimental_kernels_enabled()) return masker_conv1x1_by_dense_conv(src, w, b, wm, mb, g, act);
  const LogitStrides ls{sums.stride(0), sums.stride(1), sums.stride(2), sums.stride(3)};
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "masker_conv1x1_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      auto kernel = nhwc ? masker_kernel<scalar_t, kA, true> : masker_kernel<scalar_t, kA, false>;
      kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          src.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
          wm.data_ptr<scalar_t>(), mb.defined() ? mb.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
          sums.data_ptr<acc_t>(), ls, g, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // A no-op for float32 and float64, whose accumulator is the output dtype.
  return {y, sums.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) { m.impl("masker_conv1x1", &masker_conv1x1_cuda); }

}  // namespace laudnet_ops
