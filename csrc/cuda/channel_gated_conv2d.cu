// CUDA kernel of channel_gated_conv2d: a direct SIMT convolution, one thread per
// output element, threads ordered like memory (NCHW or channels_last). A thread
// whose output group is off writes 0 and reads nothing; the others skip every
// input gate group that is off, so work and reads follow the gate density.
// Accumulates in float (double for float64). Eligible half/bfloat16
// channels_last calls take the tensor-core grouped GEMM instead when it is
// switched on (tensor_core.h); with the experimental switch on, the calls it declines
// run as one grouped cuDNN convolution (channel_gated_sample_groups.cpp).
//
// Run on an NVIDIA H200 (sm_90): the CUDA cases of tests/test_channel_gated_conv2d.py
// pass there (benchmarks/results/gpu-NVIDIA-H200-*.md). Correct but slow -- far
// slower than cuDNN's dense conv; eligible calls take the tensor-core kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../activation.h"
#include "../channel_gated_sample_groups.h"
#include "../channel_geometry.h"
#include "../cudnn_composites.h"
#include "../tensor_core_switch.h"
#include "launch.cuh"
#include "tensor_core.h"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

template <typename scalar_t, Activation A, bool kChannelsLast>
__global__ void channel_conv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                    const scalar_t* __restrict__ bias, const bool* __restrict__ in_gates,
                                    const bool* __restrict__ out_gates, scalar_t* __restrict__ y, ConvGeometry g,
                                    int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cin_g = g.Cin / g.groups, Cout_g = g.Cout / g.groups;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t k = e, n, co, oy, ox;
    if (kChannelsLast) {
      co = k % g.Cout; k /= g.Cout;
      ox = k % g.Wo; k /= g.Wo;
      oy = k % g.Ho; n = k / g.Ho;
    } else {
      ox = k % g.Wo; k /= g.Wo;
      oy = k % g.Ho; k /= g.Ho;
      co = k % g.Cout; n = k / g.Cout;
    }
    if (out_gates != nullptr && !out_gates[n * (g.Cout / g.G) + co / g.G]) {
      y[e] = scalar_t(0);
      continue;
    }
    const int64_t ci0 = (co / Cout_g) * Cin_g;
    const scalar_t* wrow = w + co * Cin_g * g.KH * g.KW;
    acc_t acc = bias != nullptr ? acc_t(bias[co]) : acc_t(0);
    for (int64_t c = 0; c < Cin_g; ++c) {
      const int64_t ci = ci0 + c;
      if (in_gates != nullptr && !in_gates[n * (g.Cin / g.G) + ci / g.G]) {
        c += g.G - 1 - (ci % g.G);  // skip the rest of this gate group (never straddles conv groups)
        continue;
      }
      for (int64_t ky = 0; ky < g.KH; ++ky) {
        const int64_t iy = oy * g.SH - g.PH + ky * g.DH;
        if (iy < 0 || iy >= g.H) continue;
        for (int64_t kx = 0; kx < g.KW; ++kx) {
          const int64_t ix = ox * g.SW - g.PW + kx * g.DW;
          if (ix < 0 || ix >= g.W) continue;
          const int64_t xo = kChannelsLast ? ((n * g.H + iy) * g.W + ix) * g.Cin + ci
                                           : ((n * g.Cin + ci) * g.H + iy) * g.W + ix;
          acc += acc_t(x[xo]) * acc_t(wrow[(c * g.KH + ky) * g.KW + kx]);
        }
      }
    }
    y[e] = activate<A>(acc);
  }
}

at::Tensor channel_gated_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& in_gates,
                                     const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                     int64_t groups, c10::string_view activation) {
  const char* op = "channel_gated_conv2d";
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(layout));
  const int64_t total = y.numel();
  if (total == 0) return y;
  const at::Tensor src = x.contiguous(layout), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor gin = in_gates.has_value() ? in_gates->contiguous() : at::Tensor();
  const at::Tensor gout = out_gates.has_value() ? out_gates->contiguous() : at::Tensor();
  // Experimental (not yet run on a GPU): one grouped cuDNN convolution over the (sample, conv group)
  // pairs, for every call when the composites are switched on, else for the calls the tensor cores decline.
  if (cudnn_composites_enabled()) return channel_gated_conv2d_by_sample_groups(src, w, b, gin, gout, g, act);
  if (tensor_core_channel_gated_conv2d(y, src, w, b, gin, gout, g, act)) return y;
  if (experimental_kernels_enabled()) return channel_gated_conv2d_by_sample_groups(src, w, b, gin, gout, g, act);
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "channel_gated_conv2d_cuda", [&] {
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      auto kernel = nhwc ? channel_conv_kernel<scalar_t, kA, true> : channel_conv_kernel<scalar_t, kA, false>;
      kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          src.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
          gin.defined() ? gin.data_ptr<bool>() : nullptr, gout.defined() ? gout.data_ptr<bool>() : nullptr,
          y.data_ptr<scalar_t>(), g, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) { m.impl("channel_gated_conv2d", &channel_gated_conv2d_cuda); }

}  // namespace laudnet_ops
