// CUDA kernel of gather_conv2d.
//
// Run on an NVIDIA H200 (sm_90): the CUDA cases of tests/test_gather_conv2d.py
// pass there (benchmarks/results/gpu-NVIDIA-H200-*.md). Correct but slow -- far
// slower than cuDNN's dense conv; eligible calls take the tensor-core kernel, and
// with the experimental switch on the others take the halo tiles through cuDNN
// (gather_conv2d_tiles.cpp), which has not run on a GPU yet.
//
// A direct SIMT convolution: one thread per element of packed, which reads its
// receptive field (the halo) straight from x -- no gathered input, no im2col.
// Threads are ordered like packed's memory so that writes coalesce; in
// channels_last neighbouring threads are neighbouring output channels of one
// position and share their x reads through the cache. Accumulation is in
// float (double for float64). Eligible half/bfloat16 channels_last calls take the
// tensor-core kernel instead when it is switched on (tensor_core.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../activation.h"
#include "../cudnn_composites.h"
#include "../gather_conv2d_tiles.h"
#include "../tensor_core_switch.h"
#include "../spatial_conv.h"
#include "patch_grid.cuh"
#include "launch.cuh"
#include "tensor_core.h"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

template <typename scalar_t, Activation A, bool kChannelsLast>
__global__ void gather_conv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ bias, const int32_t* __restrict__ idx,
                                   scalar_t* __restrict__ out, GatherConvGeometry g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S, K = g.K;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t p, co, i, j, r = k;
    if (kChannelsLast) {
      co = r % g.Cout; r /= g.Cout;
      j = r % S; r /= S;
      i = r % S; p = r / S;
    } else {
      j = r % S; r /= S;
      i = r % S; r /= S;
      co = r % g.Cout; p = r / g.Cout;
    }
    const int64_t n = idx[3 * p], oy = idx[3 * p + 1] * S + i, ox = idx[3 * p + 2] * S + j;
    if (oy >= g.Ho || ox >= g.Wo) {  // the part of a border patch outside the map
      out[k] = scalar_t(0);
      continue;
    }
    const int64_t c0 = (co / g.Cog) * g.Cg;
    acc_t acc = bias != nullptr ? acc_t(bias[co]) : acc_t(0);
    for (int64_t kh = 0; kh < K; ++kh) {
      const int64_t iy = oy * g.stride - g.padding + kh * g.dilation;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t kw = 0; kw < K; ++kw) {
        const int64_t ix = ox * g.stride - g.padding + kw * g.dilation;
        if (ix < 0 || ix >= g.W) continue;
        const scalar_t* wp = w + (co * g.Cg * K + kh) * K + kw;  // weight[co, c, kh, kw] = wp[c * K * K]
        if (kChannelsLast) {
          const scalar_t* xp = x + ((n * g.H + iy) * g.W + ix) * g.Cin + c0;
          for (int64_t c = 0; c < g.Cg; ++c) acc += acc_t(xp[c]) * acc_t(wp[c * K * K]);
        } else {
          const scalar_t* xp = x + ((n * g.Cin + c0) * g.H + iy) * g.W + ix;
          for (int64_t c = 0; c < g.Cg; ++c) acc += acc_t(xp[c * g.H * g.W]) * acc_t(wp[c * K * K]);
        }
      }
    }
    out[k] = activate<A>(acc);
  }
}

at::Tensor gather_conv2d_cuda(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, int64_t patch_size, int64_t stride,
                              int64_t padding, int64_t dilation, int64_t groups, c10::string_view activation) {
  const char* op = "gather_conv2d";
  const GatherConvGeometry g =
      check_gather_conv_args(x, indices, weight, bias, patch_size, stride, padding, dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = indices.contiguous();
  cuda::validate_rows(idx, g.output_patches(), /*want_grid=*/false, op);
  const at::MemoryFormat layout = feature_layout(x);
  const at::Tensor src = x.contiguous(layout), wc = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor packed = at::empty({g.P, g.Cout, g.S, g.S}, x.options().memory_format(layout));
  const int64_t total = packed.numel();
  if (total == 0) return packed;
  // Experimental (not yet run on a GPU): the halo tiles through cuDNN, for every call when the
  // composites are switched on, else for the calls the tensor cores decline, instead of the kernel below.
  if (cudnn_composites_enabled()) return gather_conv2d_by_tiles(src, idx, wc, b, g, act);
  if (tensor_core_gather_conv2d(packed, src, idx, wc, b, g, act)) return packed;
  if (experimental_kernels_enabled()) return gather_conv2d_by_tiles(src, idx, wc, b, g, act);
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_conv2d_cuda", [&] {
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      auto kernel = nhwc ? gather_conv_kernel<scalar_t, kA, true> : gather_conv_kernel<scalar_t, kA, false>;
      kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          src.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
          idx.data_ptr<int32_t>(), packed.data_ptr<scalar_t>(), g, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) { m.impl("gather_conv2d", &gather_conv2d_cuda); }

}  // namespace laudnet_ops
