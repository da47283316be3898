// CPU kernel of patch_indices: a two-pass parallel compaction (count per row,
// prefix sum, fill) so the output order is exactly mask.nonzero()'s.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "../known_indices.h"

namespace laudnet_ops {
namespace {

at::Tensor patch_indices_cpu(const at::Tensor& mask) {
  const char* op = "patch_indices";
  check_dim(mask, 3, op, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ",
              mask.scalar_type());
  const int64_t N = mask.size(0), Hp = mask.size(1), Wp = mask.size(2);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max() && Hp <= std::numeric_limits<int32_t>::max() &&
                  Wp <= std::numeric_limits<int32_t>::max(),
              op, ": mask dimensions must fit in int32, got ", mask.sizes());
  const at::Tensor m = mask.contiguous();
  const bool* data = m.data_ptr<bool>();
  const int64_t rows = N * Hp;

  std::vector<int64_t> offsets(static_cast<size_t>(rows) + 1, 0);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t count = 0;
      for (int64_t x = 0; x < Wp; ++x) count += data[r * Wp + x];
      offsets[r + 1] = count;
    }
  });
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] += offsets[r];

  at::Tensor out = at::empty({offsets[rows], 3}, mask.options().dtype(at::kInt));
  int32_t* rows_out = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int32_t* dst = rows_out + 3 * offsets[r];
      const int32_t n = static_cast<int32_t>(r / Hp), py = static_cast<int32_t>(r % Hp);
      for (int64_t x = 0; x < Wp; ++x) {
        if (data[r * Wp + x]) {
          dst[0] = n;
          dst[1] = py;
          dst[2] = static_cast<int32_t>(x);
          dst += 3;
        }
      }
    }
  });
  remember_indices(out, {N, Hp, Wp});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) { m.impl("patch_indices", &patch_indices_cpu); }

}  // namespace laudnet_ops
