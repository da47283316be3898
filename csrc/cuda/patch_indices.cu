// CUDA kernel of patch_indices: stream compaction by an inclusive prefix sum
// over the flattened mask; the only host synchronisation is reading P, which
// sizes the output.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../known_indices.h"

namespace laudnet_ops {
namespace {

__global__ void compact_kernel(const bool* __restrict__ mask, const int32_t* __restrict__ position,
                               int64_t total, int64_t Hp, int64_t Wp, int32_t* __restrict__ out) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= total || !mask[k]) return;
  int32_t* row = out + 3 * static_cast<int64_t>(position[k] - 1);
  row[0] = static_cast<int32_t>(k / (Hp * Wp));
  row[1] = static_cast<int32_t>((k / Wp) % Hp);
  row[2] = static_cast<int32_t>(k % Wp);
}

at::Tensor patch_indices_cuda(const at::Tensor& mask) {
  const char* op = "patch_indices";
  check_dim(mask, 3, op, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.numel() < std::numeric_limits<int32_t>::max(), op,
              ": mask must have fewer than 2^31 elements, got ", mask.numel());
  const c10::cuda::CUDAGuard guard(mask.device());
  const auto int_opts = mask.options().dtype(at::kInt);
  const int64_t total = mask.numel();
  if (total == 0) return at::empty({0, 3}, int_opts);
  const at::Tensor flat = mask.contiguous().view({-1});
  const at::Tensor position = at::cumsum(flat, 0, at::kInt);
  const int64_t P = position[total - 1].item<int32_t>();
  at::Tensor out = at::empty({P, 3}, int_opts);
  remember_indices(out, {mask.size(0), mask.size(1), mask.size(2)});
  if (P == 0) return out;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  compact_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      flat.data_ptr<bool>(), position.data_ptr<int32_t>(), total, mask.size(1), mask.size(2),
      out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CUDA, m) { m.impl("patch_indices", &patch_indices_cuda); }

}  // namespace laudnet_ops
