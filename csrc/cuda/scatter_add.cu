// CUDA kernels of scatter_add (out of place and in place) and _gather_patches.
// One thread per element, threads ordered like memory so that neighbouring
// threads touch neighbouring addresses in both NCHW and channels_last.
//
// SIMT kernels; validated against the reference only by the CUDA tests, which
// run on a GPU machine (benchmarks/gpu_check.sh). The two scatter kernels also
// take 16-byte vectors of channels (experimental, not yet run on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../activation.h"
#include "../tensor_core_switch.h"
#include "launch.cuh"
#include "map_coords.cuh"
#include "patch_grid.cuh"
#include "vec16.cuh"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

using cuda::Coord;
using cuda::decode;
using cuda::offset;

// One thread per element of out. Elem is scalar_t, or with the experimental switch on a Vec16 of a
// channels_last pixel's channels (vec16.cuh; not yet run on a GPU); C counts Elems.
template <typename Elem, Activation A, bool kChannelsLast>
__global__ void scatter_kernel(const Elem* __restrict__ res, const Elem* __restrict__ pk, Elem* __restrict__ out,
                               const int32_t* __restrict__ grid, PatchGeometry g, int64_t C, int64_t total) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Coord q = decode<kChannelsLast>(k, C, g.H, g.W);
    const int32_t p = grid[(q.n * g.Hp + q.y / g.S) * g.Wp + q.x / g.S];
    if (p >= 0) {
      const Coord in_patch{p, q.c, q.y % g.S, q.x % g.S};
      out[k] = cuda::add_activate<A>(res[k], pk[offset<kChannelsLast>(in_patch, C, g.S, g.S)]);
    } else {
      out[k] = cuda::activate_elem<A>(res[k]);
    }
  }
}

// One thread per packed element (Elem and C as above); positions outside the map are skipped.
template <typename Elem, Activation A, bool kChannelsLast>
__global__ void scatter_inplace_kernel(Elem* __restrict__ res, const Elem* __restrict__ pk,
                                       const int32_t* __restrict__ idx, PatchGeometry g, int64_t C, int64_t total) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Coord e = decode<kChannelsLast>(k, C, g.S, g.S);  // (p, c, i, j)
    const Coord q{idx[3 * e.n], e.c, idx[3 * e.n + 1] * g.S + e.y, idx[3 * e.n + 2] * g.S + e.x};
    if (q.y >= g.H || q.x >= g.W) continue;
    Elem& r = res[offset<kChannelsLast>(q, C, g.H, g.W)];
    r = cuda::add_activate<A>(r, pk[k]);
  }
}

// With the experimental switch on, channels_last maps whose pixels are whole 16-byte vectors of
// channels take the Vec16 kernels.
bool use_channel_vectors(const PatchGeometry& g, bool nhwc, const at::Tensor& a,
                         std::initializer_list<const at::Tensor*> tensors) {
  return nhwc && experimental_kernels_enabled() && cuda::vectorizable(g.C, a.element_size(), tensors);
}

template <typename scalar_t, bool kChannelsLast>
__global__ void gather_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                              const int32_t* __restrict__ idx, PatchGeometry g, int64_t total) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Coord e = decode<kChannelsLast>(k, g.C, g.S, g.S);
    const Coord q{idx[3 * e.n], e.c, idx[3 * e.n + 1] * g.S + e.y, idx[3 * e.n + 2] * g.S + e.x};
    out[k] = (q.y < g.H && q.x < g.W) ? x[offset<kChannelsLast>(q, g.C, g.H, g.W)] : scalar_t(0);
  }
}

at::Tensor scatter_add_cuda(const at::Tensor& residual, const at::Tensor& packed,
                            const at::Tensor& indices, c10::string_view activation) {
  const char* op = "scatter_add";
  const PatchGeometry g = check_scatter_args(residual, packed, indices, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::MemoryFormat layout = feature_layout(residual);
  const at::Tensor res = residual.contiguous(layout), pk = packed.contiguous(layout);
  const at::Tensor grid = cuda::validate_rows(indices.contiguous(), g, /*want_grid=*/true, op);
  at::Tensor out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  const bool vec = use_channel_vectors(g, nhwc, res, {&res, &pk, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "scatter_add_cuda", [&] {
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      if (vec) {
        using V = cuda::Vec16<scalar_t>;
        const int64_t vectors = total / V::kLen;
        scatter_kernel<V, kA, true><<<blocks_for(vectors), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            cuda::vecs<scalar_t>(res), cuda::vecs<scalar_t>(pk), cuda::mutable_vecs<scalar_t>(out),
            grid.data_ptr<int32_t>(), g, g.C / V::kLen, vectors);
      } else {
        auto kernel = nhwc ? scatter_kernel<scalar_t, kA, true> : scatter_kernel<scalar_t, kA, false>;
        kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            res.data_ptr<scalar_t>(), pk.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            grid.data_ptr<int32_t>(), g, g.C, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

void scatter_add_inplace_cuda(const at::Tensor& residual, const at::Tensor& packed,
                              const at::Tensor& indices, c10::string_view activation) {
  const char* op = "scatter_add_";
  const PatchGeometry g = check_scatter_args(residual, packed, indices, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor idx = indices.contiguous();
  cuda::validate_rows(idx, g, /*want_grid=*/true, op);  // unique rows: no two threads write one element
  if (g.P == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  const at::Tensor pk = packed.contiguous(layout);
  const int64_t total = pk.numel();
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  const bool vec = use_channel_vectors(g, nhwc, work, {&work, &pk});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "scatter_add_cuda_", [&] {
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      if (vec) {
        using V = cuda::Vec16<scalar_t>;
        const int64_t vectors = total / V::kLen;
        scatter_inplace_kernel<V, kA, true><<<blocks_for(vectors), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            cuda::mutable_vecs<scalar_t>(work), cuda::vecs<scalar_t>(pk), idx.data_ptr<int32_t>(), g,
            g.C / V::kLen, vectors);
      } else {
        auto kernel = nhwc ? scatter_inplace_kernel<scalar_t, kA, true> : scatter_inplace_kernel<scalar_t, kA, false>;
        kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            work.data_ptr<scalar_t>(), pk.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), g, g.C, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!work.is_same(residual)) residual.copy_(work);
}

at::Tensor gather_patches_cuda(const at::Tensor& x, const at::Tensor& indices, int64_t patch_size) {
  const char* op = "_gather_patches";
  const PatchGeometry g = check_gather_args(x, indices, patch_size, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = indices.contiguous();
  cuda::validate_rows(idx, g, /*want_grid=*/false, op);
  const at::MemoryFormat layout = feature_layout(x);
  const at::Tensor src = x.contiguous(layout);
  at::Tensor out = at::empty({g.P, g.C, g.S, g.S}, x.options().memory_format(layout));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_patches_cuda", [&] {
    auto kernel = nhwc ? gather_kernel<scalar_t, true> : gather_kernel<scalar_t, false>;
    kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) {
  m.impl("scatter_add", &scatter_add_cuda);
  m.impl("scatter_add_", &scatter_add_inplace_cuda);
  m.impl("_gather_patches", &gather_patches_cuda);
}

}  // namespace laudnet_ops
