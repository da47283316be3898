// Index validation and the per-sample patch grid on the CPU.
//
// Scatter kernels look up, for every output position, which packed patch (if
// any) covers it. Building that lookup once per call costs N*Hp*Wp ints --
// 1/(C*S*S) of the map -- and lets the main loop make a single pass over the
// output. Building it also proves the indices are in range and unique, which
// is what keeps the kernels from reading or writing out of bounds.
#pragma once

#include <vector>

#include "../patch_geometry.h"

namespace laudnet_ops {
namespace cpu {

inline void fail_row(const int32_t* idx, int64_t p, const PatchGeometry& g, const char* op) {
  TORCH_CHECK(false, op, ": indices row ", p, " = (", idx[3 * p], ", ", idx[3 * p + 1], ", ",
              idx[3 * p + 2], ") is outside the patch grid (N=", g.N, ", Hp=", g.Hp,
              ", Wp=", g.Wp, ") of a ", g.H, "x", g.W, " map with patch size ", g.S);
}

inline bool row_in_range(const int32_t* idx, int64_t p, const PatchGeometry& g) {
  return idx[3 * p] >= 0 && idx[3 * p] < g.N && idx[3 * p + 1] >= 0 && idx[3 * p + 1] < g.Hp &&
         idx[3 * p + 2] >= 0 && idx[3 * p + 2] < g.Wp;
}

inline void check_rows_in_range(const at::Tensor& indices, const PatchGeometry& g, const char* op) {
  const int32_t* idx = indices.data_ptr<int32_t>();
  for (int64_t p = 0; p < g.P; ++p) {
    if (!row_in_range(idx, p, g)) fail_row(idx, p, g, op);
  }
}

// grid[(n * Hp + py) * Wp + px] = row of indices covering that patch, or -1.
inline std::vector<int32_t> build_patch_grid(const at::Tensor& indices, const PatchGeometry& g,
                                             const char* op) {
  std::vector<int32_t> grid(static_cast<size_t>(g.N * g.Hp * g.Wp), -1);
  const int32_t* idx = indices.data_ptr<int32_t>();
  for (int64_t p = 0; p < g.P; ++p) {
    if (!row_in_range(idx, p, g)) fail_row(idx, p, g, op);
    int32_t& cell = grid[(idx[3 * p] * g.Hp + idx[3 * p + 1]) * g.Wp + idx[3 * p + 2]];
    TORCH_CHECK(cell < 0, op, ": indices rows ", cell, " and ", p, " name the same patch (",
                idx[3 * p], ", ", idx[3 * p + 1], ", ", idx[3 * p + 2],
                "); rows must be unique, as patch_indices returns them");
    cell = static_cast<int32_t>(p);
  }
  return grid;
}

}  // namespace cpu
}  // namespace laudnet_ops
