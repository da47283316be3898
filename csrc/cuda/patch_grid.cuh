// Index validation and the per-sample patch grid on the GPU.
//
// One thread per indices row checks its range and claims its grid cell with
// atomicCAS; a row out of range or a duplicate is recorded in a small status
// buffer instead of being followed, so no kernel ever touches memory outside
// its tensors. The status is read back once (a single small copy) so the error
// can name the offending row, as the CPU backend does. With the experimental
// switch on (not yet run on a GPU), rows that patch_indices made and nobody has
// changed since skip that read: the kernel still builds the grid, and no host
// synchronisation waits for it (known_indices.cpp).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "../known_indices.h"
#include "../patch_geometry.h"
#include "../tensor_core_switch.h"

namespace laudnet_ops {
namespace cuda {

namespace {

// status[0]: first row out of range, status[1]: first duplicate row (INT_MAX = none).
__global__ void validate_rows_kernel(const int32_t* __restrict__ idx, int64_t P, int64_t N, int64_t Hp,
                                     int64_t Wp, int32_t* __restrict__ grid, int32_t* __restrict__ status) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= P) return;
  const int32_t n = idx[3 * p], py = idx[3 * p + 1], px = idx[3 * p + 2];
  if (n < 0 || n >= N || py < 0 || py >= Hp || px < 0 || px >= Wp) {
    atomicMin(&status[0], static_cast<int32_t>(p));
    return;
  }
  if (grid != nullptr) {
    const int32_t prev = atomicCAS(&grid[(n * Hp + py) * Wp + px], -1, static_cast<int32_t>(p));
    if (prev != -1) atomicMin(&status[1], static_cast<int32_t>(p > prev ? p : prev));
  }
}

}  // namespace

// Checks the rows and, when want_grid, returns grid[(n * Hp + py) * Wp + px] = row or -1.
inline at::Tensor validate_rows(const at::Tensor& indices, const PatchGeometry& g, bool want_grid,
                                const char* op) {
  TORCH_CHECK(g.P < std::numeric_limits<int32_t>::max(), op, ": too many patches (", g.P, ")");
  const auto int_opts = indices.options().dtype(at::kInt);
  at::Tensor grid = want_grid ? at::full({g.N * g.Hp * g.Wp}, -1, int_opts) : at::Tensor();
  if (g.P == 0) return grid;
  const bool known = experimental_kernels_enabled() && known_indices(indices, {g.N, g.Hp, g.Wp});
  if (known && !want_grid) return grid;
  at::Tensor status = at::full({2}, std::numeric_limits<int32_t>::max(), int_opts);
  const int threads = 256;
  const int64_t blocks = (g.P + threads - 1) / threads;
  validate_rows_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      indices.data_ptr<int32_t>(), g.P, g.N, g.Hp, g.Wp, want_grid ? grid.data_ptr<int32_t>() : nullptr,
      status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (known) return grid;
  const at::Tensor host = status.cpu();
  const int32_t bad = host.data_ptr<int32_t>()[0], dup = host.data_ptr<int32_t>()[1];
  if (bad != std::numeric_limits<int32_t>::max() || dup != std::numeric_limits<int32_t>::max()) {
    const int64_t row = bad != std::numeric_limits<int32_t>::max() ? bad : dup;
    const at::Tensor r = indices[row].cpu();
    const int32_t* v = r.data_ptr<int32_t>();
    TORCH_CHECK(dup == std::numeric_limits<int32_t>::max() || bad != std::numeric_limits<int32_t>::max(),
                op, ": indices row ", row, " = (", v[0], ", ", v[1], ", ", v[2],
                ") names a patch named by an earlier row; rows must be unique, as patch_indices returns them");
    TORCH_CHECK(false, op, ": indices row ", row, " = (", v[0], ", ", v[1], ", ", v[2],
                ") is outside the patch grid (N=", g.N, ", Hp=", g.Hp, ", Wp=", g.Wp, ") of a ", g.H, "x",
                g.W, " map with patch size ", g.S);
  }
  return grid;
}

}  // namespace cuda
}  // namespace laudnet_ops
