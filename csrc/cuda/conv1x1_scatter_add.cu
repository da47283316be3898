// CUDA kernels of conv1x1_scatter_add (out of place and in place).
//
// Run on an NVIDIA H200 (sm_90): the CUDA tests pass there
// (benchmarks/results/gpu-NVIDIA-H200-*.md); eligible calls take the tensor cores.
//
// SIMT kernels, one thread per written element; each covered element is the
// dot product of its Cin packed channels with a column of the weight. The
// weight is read as (Cin, Cout) so that in channels_last neighbouring threads
// (neighbouring channels) read neighbouring weights, while all of them read
// the same packed value; in NCHW neighbouring threads (neighbouring columns)
// share the weight and read neighbouring packed values. The tensor-core kernel
// (tensor_core/conv1x1_scatter_add.cu, behind the switch) is tried first by
// both ops for channels_last maps; with the experimental switch on, the calls it
// declines take cuDNN's 1x1 conv and the scatter_add kernel
// (conv1x1_composites.cpp), which have not run on a GPU yet.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/relu.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../activation.h"
#include "../conv1x1_composites.h"
#include "../cudnn_composites.h"
#include "../conv1x1_scatter.h"
#include "../tensor_core_switch.h"
#include "launch.cuh"
#include "map_coords.cuh"
#include "patch_grid.cuh"
#include "tensor_core.h"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

using cuda::Coord;
using cuda::decode;
using cuda::offset;

// conv1x1(packed, weight, bias)[p, c, i, j], accumulated in acc_t.
template <typename scalar_t, bool kChannelsLast>
__device__ inline at::opmath_type<scalar_t> conv_at(const scalar_t* __restrict__ pk, const scalar_t* __restrict__ wt,
                                                    const scalar_t* __restrict__ bias, int64_t p, int64_t c,
                                                    int64_t i, int64_t j, int64_t Cin, int64_t Cout, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v = bias != nullptr ? acc_t(bias[c]) : acc_t(0);
  const int64_t base = kChannelsLast ? ((p * S + i) * S + j) * Cin : p * Cin * S * S + i * S + j;
  const int64_t step = kChannelsLast ? 1 : S * S;
  for (int64_t ci = 0; ci < Cin; ++ci) v += acc_t(pk[base + ci * step]) * acc_t(wt[ci * Cout + c]);
  return v;
}

// Out of place: one thread per element of out.
template <typename scalar_t, Activation A, bool kChannelsLast>
__global__ void conv_scatter_kernel(const scalar_t* __restrict__ res, const scalar_t* __restrict__ pk,
                                    const scalar_t* __restrict__ wt, const scalar_t* __restrict__ bias,
                                    scalar_t* __restrict__ out, const int32_t* __restrict__ grid, PatchGeometry g,
                                    int64_t Cin, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Coord q = decode<kChannelsLast>(k, g.C, g.H, g.W);
    const int32_t p = grid[(q.n * g.Hp + q.y / g.S) * g.Wp + q.x / g.S];
    acc_t v = acc_t(res[k]);
    if (p >= 0) v += conv_at<scalar_t, kChannelsLast>(pk, wt, bias, p, q.c, q.y % g.S, q.x % g.S, Cin, g.C, g.S);
    out[k] = activate<A>(v);
  }
}

// In place: one thread per (p, c, i, j) of the convolution's output; positions outside the map are skipped.
template <typename scalar_t, Activation A, bool kChannelsLast>
__global__ void conv_scatter_inplace_kernel(scalar_t* __restrict__ res, const scalar_t* __restrict__ pk,
                                            const scalar_t* __restrict__ wt, const scalar_t* __restrict__ bias,
                                            const int32_t* __restrict__ idx, PatchGeometry g, int64_t Cin,
                                            int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Coord e = decode<kChannelsLast>(k, g.C, g.S, g.S);  // (p, c, i, j)
    const Coord q{idx[3 * e.n], e.c, idx[3 * e.n + 1] * g.S + e.y, idx[3 * e.n + 2] * g.S + e.x};
    if (q.y >= g.H || q.x >= g.W) continue;
    scalar_t& r = res[offset<kChannelsLast>(q, g.C, g.H, g.W)];
    r = activate<A>(acc_t(r) + conv_at<scalar_t, kChannelsLast>(pk, wt, bias, e.n, e.c, e.y, e.x, Cin, g.C, g.S));
  }
}

struct Launch {
  at::Tensor res, out, pk, wt, bias, grid_or_idx;
  bool inplace, nhwc;
  int64_t total;
};

template <typename scalar_t, Activation A>
void launch_simt(const Launch& l, const Conv1x1ScatterGeometry& g) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* bias = l.bias.defined() ? l.bias.data_ptr<scalar_t>() : nullptr;
  if (l.inplace) {
    auto kernel =
        l.nhwc ? conv_scatter_inplace_kernel<scalar_t, A, true> : conv_scatter_inplace_kernel<scalar_t, A, false>;
    kernel<<<blocks_for(l.total), kThreads, 0, stream>>>(l.out.data_ptr<scalar_t>(), l.pk.data_ptr<scalar_t>(),
                                                          l.wt.data_ptr<scalar_t>(), bias,
                                                          l.grid_or_idx.data_ptr<int32_t>(), g.out, g.Cin, l.total);
  } else {
    auto kernel = l.nhwc ? conv_scatter_kernel<scalar_t, A, true> : conv_scatter_kernel<scalar_t, A, false>;
    kernel<<<blocks_for(l.total), kThreads, 0, stream>>>(l.res.data_ptr<scalar_t>(), l.pk.data_ptr<scalar_t>(),
                                                          l.wt.data_ptr<scalar_t>(), bias, l.out.data_ptr<scalar_t>(),
                                                          l.grid_or_idx.data_ptr<int32_t>(), g.out, g.Cin, l.total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_conv1x1_scatter(const Launch& l, const Conv1x1ScatterGeometry& g, Activation act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.out.scalar_type(), "conv1x1_scatter_add_cuda", [&] {
    with_activation(act, [&](auto A) { launch_simt<scalar_t, decltype(A)::value>(l, g); });
  });
}

at::Tensor bias_or_undefined(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
}

at::Tensor conv1x1_scatter_add_cuda(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                    c10::string_view activation) {
  const char* op = "conv1x1_scatter_add";
  const Conv1x1ScatterGeometry g = check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::MemoryFormat layout = feature_layout(residual);
  Launch l;
  l.grid_or_idx = cuda::validate_rows(indices.contiguous(), g.out, /*want_grid=*/true, op);
  l.res = residual.contiguous(layout);
  l.out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  l.total = l.out.numel();
  if (l.total == 0) return l.out;
  l.pk = packed.contiguous(layout);
  // Experimental (not yet run on a GPU): the 1x1 conv by cuDNN, then the scatter_add kernel -- for every
  // call when the composites are switched on, else for the calls the tensor cores decline.
  if (cudnn_composites_enabled()) {
    return conv1x1_scatter_add_by_dense_conv(l.res, l.pk, indices, weight, bias_or_undefined(bias), activation);
  }
  // Tensor cores (switch on, eligible call): their epilogue updates the covered positions of a map
  // that holds the residual, so out starts as a copy of it and the activation of the uncovered
  // positions follows (ReLU is idempotent on the covered ones).
  if (layout == at::MemoryFormat::ChannelsLast && tensor_cores_enabled()) {
    at::Tensor out = l.res.clone(at::MemoryFormat::ChannelsLast);
    if (tensor_core_conv1x1_scatter_add(out, l.pk, indices, weight, bias, act)) {
      if (act == Activation::kRelu) out.relu_();
      return out;
    }
  }
  if (experimental_kernels_enabled()) {
    return conv1x1_scatter_add_by_dense_conv(l.res, l.pk, indices, weight, bias_or_undefined(bias), activation);
  }
  l.wt = weight.squeeze(3).squeeze(2).t().contiguous();  // (Cin, Cout)
  l.bias = bias_or_undefined(bias);
  l.inplace = false;
  l.nhwc = layout == at::MemoryFormat::ChannelsLast;
  launch_conv1x1_scatter(l, g, act);
  return l.out;
}

void conv1x1_scatter_add_inplace_cuda(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                      const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                      c10::string_view activation) {
  const char* op = "conv1x1_scatter_add_";
  const Conv1x1ScatterGeometry g = check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  Launch l;
  l.grid_or_idx = indices.contiguous();
  cuda::validate_rows(l.grid_or_idx, g.out, /*want_grid=*/true, op);  // unique rows: no two threads write one element
  if (g.out.P == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  l.out = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  l.pk = packed.contiguous(layout);
  const bool composite_first = cudnn_composites_enabled();  // as in the out-of-place op
  if (!composite_first && layout == at::MemoryFormat::ChannelsLast &&
      tensor_core_conv1x1_scatter_add(l.out, l.pk, l.grid_or_idx, weight, bias, act)) {
    if (!l.out.is_same(residual)) residual.copy_(l.out);
    return;
  }
  if (composite_first || experimental_kernels_enabled()) {
    conv1x1_scatter_add_by_dense_conv_(l.out, l.pk, l.grid_or_idx, weight, bias_or_undefined(bias), activation);
    if (!l.out.is_same(residual)) residual.copy_(l.out);
    return;
  }
  l.wt = weight.squeeze(3).squeeze(2).t().contiguous();
  l.bias = bias_or_undefined(bias);
  l.inplace = true;
  l.nhwc = layout == at::MemoryFormat::ChannelsLast;
  l.total = g.out.P * g.out.C * g.out.S * g.out.S;
  launch_conv1x1_scatter(l, g, act);
  if (!l.out.is_same(residual)) residual.copy_(l.out);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) {
  m.impl("conv1x1_scatter_add", &conv1x1_scatter_add_cuda);
  m.impl("conv1x1_scatter_add_", &conv1x1_scatter_add_inplace_cuda);
}

}  // namespace laudnet_ops
