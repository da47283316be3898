// Schemas of the layer-skipping ops: the samples whose block runs are gathered
// into a smaller batch, and the block's output is added back onto the residual
// of those samples only. Also the unfused form of sample_scatter_add_pool_ for
// devices without a fused kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "sample_rows.h"

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // gates: bool (N,) -> (x[sel], sel), sel int32 (K,) the indices of the samples whose gate is on.
  m.def("sample_gather(Tensor x, Tensor gates) -> (Tensor, Tensor)");
  // out = act(residual); out[sel] = act(residual[sel] + y); sel unique and in range.
  m.def("sample_scatter_add(Tensor residual, Tensor y, Tensor sel, str activation=\"relu\") -> Tensor");
  m.def("sample_scatter_add_(Tensor(a!) residual, Tensor y, Tensor sel, str activation=\"relu\") -> ()");
  // sample_scatter_add_ on a 4-D map that also sets pooled[sel] (N, C) to the channel means of the
  // updated samples (the other rows are left as they are): the next block's masker input for free.
  m.def("sample_scatter_add_pool_(Tensor(a!) residual, Tensor y, Tensor sel, Tensor(b!) pooled, "
        "str activation=\"relu\") -> ()");
  // x[sel] for any in-range sel (the adjoint of sample_scatter_add, used by its backward).
  m.def("_sample_index(Tensor x, Tensor sel) -> Tensor");
}

namespace laudnet_ops {
namespace {

// Devices without a fused kernel (CUDA): the scatter, then the means of the updated samples.
void sample_scatter_add_pool_unfused(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                     const at::Tensor& pooled, c10::string_view activation) {
  const char* op = "sample_scatter_add_pool_";
  check_sample_scatter_args(residual, y, sel, op);
  check_pooled(residual, pooled, op);
  parse_activation(activation, op);
  static const auto scatter =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("laudnet_ops::sample_scatter_add_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view)>();
  scatter.call(residual, y, sel, activation);  // checks sel's range before writing
  const at::Tensor rows = sel.to(at::kLong);
  pooled.index_copy_(0, rows, residual.index_select(0, rows).mean({2, 3}));
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CompositeExplicitAutograd, m) {
  m.impl("sample_scatter_add_pool_", &sample_scatter_add_pool_unfused);
}

}  // namespace laudnet_ops
