// CUDA kernels of the layer-skipping ops: row copies, one thread per element
// with neighbouring threads on neighbouring addresses (a sample is one
// contiguous block in NCHW and channels_last alike).
//
// Run on an NVIDIA H200 (sm_90): the CUDA cases of tests/test_layer_skip.py
// pass there (benchmarks/results/gpu-NVIDIA-H200-*.md). With the experimental
// switch on, rows that allow it move as 16-byte vectors instead
// (row_vectors.cuh, not yet run on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../activation.h"
#include "../known_indices.h"
#include "../tensor_core_switch.h"
#include "launch.cuh"
#include "row_vectors.cuh"
#include "sample_table.cuh"

namespace laudnet_ops {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

#define GRID_STRIDE_LOOP(e, total)                                                        \
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < (total); \
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename scalar_t>
__global__ void copy_rows_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                 const int32_t* __restrict__ rows, int64_t R, int64_t total) {
  GRID_STRIDE_LOOP(e, total) {
    const int64_t k = e / R, i = e % R;
    dst[e] = src[static_cast<int64_t>(rows[k]) * R + i];
  }
}

template <typename scalar_t, Activation A>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ res, const scalar_t* __restrict__ y,
                                    scalar_t* __restrict__ out, const int32_t* __restrict__ slot, int64_t R,
                                    int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  GRID_STRIDE_LOOP(e, total) {
    const int64_t n = e / R, i = e % R;
    const int32_t k = slot[n];
    acc_t v = acc_t(res[e]);
    if (k >= 0) v += acc_t(y[static_cast<int64_t>(k) * R + i]);
    out[e] = activate<A>(v);
  }
}

template <typename scalar_t, Activation A>
__global__ void scatter_rows_inplace_kernel(scalar_t* __restrict__ res, const scalar_t* __restrict__ y,
                                            const int32_t* __restrict__ sel, int64_t R, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  GRID_STRIDE_LOOP(e, total) {
    const int64_t k = e / R, i = e % R;
    scalar_t& r = res[static_cast<int64_t>(sel[k]) * R + i];
    r = activate<A>(acc_t(r) + acc_t(y[e]));
  }
}

// Whether a call takes the vector kernels: experimental, and rows that are whole 16-byte vectors.
bool use_row_vectors(int64_t R, const at::Tensor& a, std::initializer_list<const at::Tensor*> tensors) {
  return experimental_kernels_enabled() && cuda::vectorizable(R, a.element_size(), tensors);
}

void launch_copy_rows(const at::Tensor& src, at::Tensor& dst, const at::Tensor& rows, int64_t R) {
  const int64_t total = dst.numel();
  if (total == 0) return;
  if (use_row_vectors(R, src, {&src, &dst})) {
    const int64_t K = dst.size(0), Rv = R * src.element_size() / 16;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_rows_vec_cuda", [&] {
      cuda::copy_rows_vec_kernel<scalar_t><<<cuda::row_grid(K, Rv), cuda::kRowThreads, 0,
                                             at::cuda::getCurrentCUDAStream()>>>(
          cuda::vecs<scalar_t>(src), cuda::mutable_vecs<scalar_t>(dst), rows.data_ptr<int32_t>(), K, Rv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_rows_cuda", [&] {
    copy_rows_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), R, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> sample_gather_cuda(const at::Tensor& x, const at::Tensor& gates) {
  const char* op = "sample_gather";
  const SampleRows s = check_sample_gather_args(x, gates, op);
  const c10::cuda::CUDAGuard guard(x.device());
  // The compaction is ATen's; reading its size is the one host synchronisation.
  const at::Tensor sel = at::nonzero(gates).view({-1}).to(at::kInt);
  remember_indices(sel, {s.N});
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor out = at::empty(rows_shape(x, sel.size(0)), x.options().memory_format(layout));
  launch_copy_rows(x.contiguous(layout), out, sel, s.R);
  return {out, sel};
}

at::Tensor sample_index_cuda(const at::Tensor& x, const at::Tensor& sel) {
  const char* op = "_sample_index";
  const SampleRows s = check_sample_index_args(x, sel, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = sel.contiguous();
  cuda::validate_sel(idx, s.N, /*want_slots=*/false, op);
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor out = at::empty(rows_shape(x, s.K), x.options().memory_format(layout));
  launch_copy_rows(x.contiguous(layout), out, idx, s.R);
  return out;
}

at::Tensor sample_scatter_add_cuda(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                   c10::string_view activation) {
  const char* op = "sample_scatter_add";
  const SampleRows s = check_sample_scatter_args(residual, y, sel, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor slot = cuda::validate_sel(sel.contiguous(), s.N, /*want_slots=*/true, op);
  const at::MemoryFormat layout = feature_layout(residual);
  at::Tensor out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor res = residual.contiguous(layout), yy = y.contiguous(layout);
  if (use_row_vectors(s.R, res, {&res, &yy, &out})) {
    const int64_t Rv = s.R * res.element_size() / 16;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "sample_scatter_add_vec_cuda", [&] {
      with_activation(act, [&](auto A) {
        cuda::scatter_rows_vec_kernel<scalar_t, decltype(A)::value>
            <<<cuda::row_grid(s.N, Rv), cuda::kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                cuda::vecs<scalar_t>(res), cuda::vecs<scalar_t>(yy), cuda::mutable_vecs<scalar_t>(out),
                slot.data_ptr<int32_t>(), s.N, Rv);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "sample_scatter_add_cuda", [&] {
    with_activation(act, [&](auto A) {
      scatter_rows_kernel<scalar_t, decltype(A)::value>
          <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              res.data_ptr<scalar_t>(), yy.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              slot.data_ptr<int32_t>(), s.R, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

void sample_scatter_add_inplace_cuda(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                     c10::string_view activation) {
  const char* op = "sample_scatter_add_";
  const SampleRows s = check_sample_scatter_args(residual, y, sel, op);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor idx = sel.contiguous();
  cuda::validate_sel(idx, s.N, /*want_slots=*/true, op);  // unique: no two threads write one element
  const int64_t total = s.K * s.R;
  if (total == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  const at::Tensor yy = y.contiguous(layout);
  if (use_row_vectors(s.R, work, {&work, &yy})) {
    const int64_t Rv = s.R * work.element_size() / 16;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "sample_scatter_add_vec_cuda_", [&] {
      with_activation(act, [&](auto A) {
        cuda::scatter_rows_inplace_vec_kernel<scalar_t, decltype(A)::value>
            <<<cuda::row_grid(s.K, Rv), cuda::kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                cuda::mutable_vecs<scalar_t>(work), cuda::vecs<scalar_t>(yy), idx.data_ptr<int32_t>(), s.K, Rv);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "sample_scatter_add_cuda_", [&] {
      with_activation(act, [&](auto A) {
        scatter_rows_inplace_kernel<scalar_t, decltype(A)::value>
            <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                work.data_ptr<scalar_t>(), yy.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), s.R, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (!work.is_same(residual)) residual.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) {
  m.impl("sample_gather", &sample_gather_cuda);
  m.impl("sample_scatter_add", &sample_scatter_add_cuda);
  m.impl("sample_scatter_add_", &sample_scatter_add_inplace_cuda);
  m.impl("_sample_index", &sample_index_cuda);
}

}  // namespace laudnet_ops
