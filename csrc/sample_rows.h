// Argument checks of the layer-skipping ops (sample_gather, sample_scatter_add,
// _sample_index), shared by the CPU and CUDA backends. A tensor is seen as N
// rows ("samples") of R = numel / N elements each: in both NCHW and
// channels_last a sample is one contiguous block, so these ops are row copies
// in either layout.
#pragma once

#include <ATen/MemoryOverlap.h>

#include <vector>

#include "checks.h"

namespace laudnet_ops {

struct SampleRows {
  int64_t N;  // rows of the dense tensor (residual or x)
  int64_t R;  // elements per row
  int64_t K;  // selected rows
};

inline int64_t row_elements(const at::Tensor& t) {
  int64_t r = 1;
  for (int64_t d = 1; d < t.dim(); ++d) r *= t.size(d);
  return r;
}

inline void check_sel_shape(const at::Tensor& sel, const char* op) {
  TORCH_CHECK(sel.scalar_type() == at::kInt, op, ": sel must be int32 (as sample_gather returns), got ",
              sel.scalar_type());
  TORCH_CHECK(sel.dim() == 1, op, ": sel must be a 1-D tensor, got shape ", sel.sizes());
}

inline void check_has_rows(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", arg, " must have a sample dimension (at least 1-D), got a 0-D tensor");
}

inline SampleRows check_sample_gather_args(const at::Tensor& x, const at::Tensor& gates, const char* op) {
  check_has_rows(x, op, "x");
  check_floating(x, op, "x");
  TORCH_CHECK(gates.scalar_type() == at::kBool, op, ": gates must be a bool tensor, got ", gates.scalar_type());
  TORCH_CHECK(gates.dim() == 1 && gates.size(0) == x.size(0), op, ": gates must have shape (N,) = (", x.size(0),
              ",), got ", gates.sizes());
  check_same_device(x, gates, op, "x", "gates");
  return {x.size(0), row_elements(x), -1};
}

inline SampleRows check_sample_scatter_args(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                            const char* op) {
  check_has_rows(residual, op, "residual");
  check_floating(residual, op, "residual");
  check_same_dtype(residual, y, op, "residual", "y");
  check_same_device(residual, y, op, "residual", "y");
  check_same_device(residual, sel, op, "residual", "sel");
  check_sel_shape(sel, op);
  TORCH_CHECK(y.dim() == residual.dim() && y.sizes().slice(1) == residual.sizes().slice(1), op,
              ": y must have shape (K, ", residual.sizes().slice(1), ") to match residual ", residual.sizes(),
              ", got ", y.sizes());
  TORCH_CHECK(y.size(0) == sel.size(0), op, ": y holds ", y.size(0), " samples but sel has ", sel.size(0),
              " entries");
  return {residual.size(0), row_elements(residual), sel.size(0)};
}

// The channel means that sample_scatter_add_pool_ keeps up to date: (N, C) of a 4-D residual.
inline void check_pooled(const at::Tensor& residual, const at::Tensor& pooled, const char* op) {
  TORCH_CHECK(residual.dim() == 4, op, ": residual must be a 4-D (N, C, H, W) map to be pooled, got shape ",
              residual.sizes());
  TORCH_CHECK(pooled.dim() == 2 && pooled.size(0) == residual.size(0) && pooled.size(1) == residual.size(1), op,
              ": pooled must have shape (N, C) = (", residual.size(0), ", ", residual.size(1), "), got ",
              pooled.sizes());
  check_same_dtype(residual, pooled, op, "residual", "pooled");
  check_same_device(residual, pooled, op, "residual", "pooled");
  const at::MemOverlapStatus shared = at::get_overlap_status(residual, pooled);
  TORCH_CHECK(shared != at::MemOverlapStatus::Full && shared != at::MemOverlapStatus::Partial, op,
              ": residual and pooled share memory; both are written");
}

inline SampleRows check_sample_index_args(const at::Tensor& x, const at::Tensor& sel, const char* op) {
  check_has_rows(x, op, "x");
  check_floating(x, op, "x");
  check_same_device(x, sel, op, "x", "sel");
  check_sel_shape(sel, op);
  return {x.size(0), row_elements(x), sel.size(0)};
}

// The layout rows are copied in, and the shape of K rows of t in it.
inline std::vector<int64_t> rows_shape(const at::Tensor& t, int64_t K) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] = K;
  return shape;
}

}  // namespace laudnet_ops
