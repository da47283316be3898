// Validation of sample indices (sel) on the GPU, and the per-sample slot table.
//
// One thread per sel entry checks its range and claims its sample's slot with
// atomicCAS; an entry out of range or a duplicate is recorded in a small status
// buffer instead of being followed, so no kernel touches memory outside its
// tensors. The status is read back once (one small copy) so the error names the
// offending entry, as the CPU backend does. With the experimental switch on (not
// yet run on a GPU), a sel that sample_gather made and nobody has changed since
// skips that read: the kernel still builds the slot table, and no host
// synchronisation waits for it (known_indices.cpp).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "../known_indices.h"
#include "../sample_rows.h"
#include "../tensor_core_switch.h"

namespace laudnet_ops {
namespace cuda {

namespace {

// status[0]: first entry out of range, status[1]: first duplicate entry (INT_MAX = none).
__global__ void validate_sel_kernel(const int32_t* __restrict__ sel, int64_t K, int64_t N,
                                    int32_t* __restrict__ slot, int32_t* __restrict__ status) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  const int32_t n = sel[k];
  if (n < 0 || n >= N) {
    atomicMin(&status[0], static_cast<int32_t>(k));
    return;
  }
  if (slot != nullptr) {
    const int32_t prev = atomicCAS(&slot[n], -1, static_cast<int32_t>(k));
    if (prev != -1) atomicMin(&status[1], static_cast<int32_t>(k > prev ? k : prev));
  }
}

}  // namespace

// Checks sel and, when want_slots, returns slot[n] = k with sel[k] == n, or -1.
inline at::Tensor validate_sel(const at::Tensor& sel, int64_t N, bool want_slots, const char* op) {
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  const int64_t K = sel.numel();
  TORCH_CHECK(K < kNone, op, ": too many samples in sel (", K, ")");
  const auto int_opts = sel.options().dtype(at::kInt);
  at::Tensor slot = want_slots ? at::full({N}, -1, int_opts) : at::Tensor();
  if (K == 0) return slot;
  const bool known = experimental_kernels_enabled() && known_indices(sel, {N});
  if (known && !want_slots) return slot;
  at::Tensor status = at::full({2}, kNone, int_opts);
  const int threads = 256;
  validate_sel_kernel<<<(K + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sel.data_ptr<int32_t>(), K, N, want_slots ? slot.data_ptr<int32_t>() : nullptr, status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (known) return slot;
  const at::Tensor host = status.cpu();
  const int32_t bad = host.data_ptr<int32_t>()[0], dup = host.data_ptr<int32_t>()[1];
  if (bad != kNone) {
    const int32_t v = sel[bad].item<int32_t>();
    TORCH_CHECK(false, op, ": sel[", bad, "] = ", v, " is outside the batch [0, ", N, ")");
  }
  if (dup != kNone) {
    const int32_t v = sel[dup].item<int32_t>();
    TORCH_CHECK(false, op, ": sel[", dup, "] = ", v,
                " names a sample named by another entry; sel must be unique, as sample_gather returns it");
  }
  return slot;
}

}  // namespace cuda
}  // namespace laudnet_ops
