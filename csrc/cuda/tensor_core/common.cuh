// Eligibility tests and small helpers shared by the tensor-core entry points.
//
// RUN ON AN NVIDIA H200 (sm_90) with the kernels that use it; never run on sm_80 hardware.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/ScalarType.h>
#include <cute/config.hpp>
#include <cute/numeric/numeric_types.hpp>

#include <cstdint>

#include "../../checks.h"
#include "../../tensor_core_switch.h"

namespace laudnet_ops {
namespace tc {

inline bool is_tensor_core_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// cp.async moves 16 bytes: every vector's address must be a multiple of 16.
inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// mma.sync with bf16 and cp.async need sm_80 or newer.
inline bool device_has_sm80_tensor_cores(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->major >= 8;
}

// A feature map the kernels read or write: channels_last memory order, 16-byte aligned.
inline bool channels_last_map(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(t);
}

// The checks every entry point starts with: switch on, half/bf16, an sm_80+ device.
inline bool switch_and_device_allow(const at::Tensor& x) {
  return tensor_cores_enabled() && is_tensor_core_dtype(x) && x.is_cuda() && device_has_sm80_tensor_cores(x);
}

// Calls f with a value of the CuTe element type matching dtype (half or bfloat16 only).
template <class F>
void dispatch_elem(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) {
    f(cute::half_t{});
  } else {
    f(cute::bfloat16_t{});
  }
}

template <class Elem>
const Elem* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const Elem*>(t.data_ptr()) : nullptr;
}

template <class Elem>
Elem* mptr(at::Tensor& t) {
  return reinterpret_cast<Elem*>(t.data_ptr());
}

// The runtime activation of an epilogue (one kernel for both kinds keeps the build small).
CUTE_HOST_DEVICE float epilogue_activation(float v, bool relu) {
  return relu && v < 0.f ? 0.f : v;  // keeps NaN, like torch.relu
}

// The next tap of a KW-wide kernel, row-major: its column kx and its offsets (dx, dy) from tap 0,
// with (step_x, step_y) the dilation. The loaders' k stepping wraps into it.
CUTE_HOST_DEVICE void next_tap(int& kx, int& dx, int& dy, int KW, int step_x, int step_y) {
  if (++kx == KW) {
    kx = 0;
    dx = 0;
    dy += step_y;
  } else {
    dx += step_x;
  }
}

// The CPU emulation ops take float32 tensors on the CPU only.
inline void check_emulation_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op,
              ": the emulation takes float32 CPU tensors, got ", x.scalar_type(), " on ", x.device());
}

// Patch rows inside the grid (the emulation's memory safety; the CUDA ops validate on the device).
inline void check_rows_in_grid(const at::Tensor& idx, int64_t N, int64_t Hp, int64_t Wp, const char* op) {
  const int32_t* v = idx.data_ptr<int32_t>();
  for (int64_t p = 0; p < idx.size(0); ++p) {
    TORCH_CHECK(v[3 * p] >= 0 && v[3 * p] < N && v[3 * p + 1] >= 0 && v[3 * p + 1] < Hp && v[3 * p + 2] >= 0 &&
                    v[3 * p + 2] < Wp,
                op, ": indices row ", p, " is outside the patch grid");
  }
}

}  // namespace tc
}  // namespace laudnet_ops
