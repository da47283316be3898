// Argument checks shared by every op and backend. Each message names the op,
// the argument, what was expected and what came, so a user can fix the call
// without reading kernel code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace laudnet_ops {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be a ", dim, "-D tensor, got ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", arg_a, " and ", arg_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", arg_a, " and ", arg_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", arg,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// Patch indices are the int32 (P, 3) rows (n, py, px) that patch_indices returns.
// Their values are range-checked by each backend (on the device for CUDA).
inline void check_indices_shape(const at::Tensor& indices, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kInt, op,
              ": indices must be int32 (as patch_indices returns), got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2 && indices.size(1) == 3, op,
              ": indices must have shape (P, 3), got ", indices.sizes());
}

enum class Activation { kNone, kRelu };

inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "relu") return Activation::kRelu;
  if (name == "none") return Activation::kNone;
  TORCH_CHECK(false, op, ": activation must be \"relu\" or \"none\", got \"", std::string(name), "\"");
}

// Feature maps are computed in one of two layouts; anything else is copied to
// the closer one first. The rule is mirrored by the fake kernels in Python.
inline at::MemoryFormat feature_layout(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace laudnet_ops
