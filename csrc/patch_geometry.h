// Shape checks for ops that move (P, C, S, S) patches in and out of an
// (N, C, H, W) map. Shared by the CPU and CUDA backends so both reject the
// same calls with the same words.
#pragma once

#include "checks.h"

namespace laudnet_ops {

struct PatchGeometry {
  int64_t N, C, H, W;  // the dense map
  int64_t S;           // patch size
  int64_t Hp, Wp;      // patch grid, ceil(H / S) x ceil(W / S)
  int64_t P;           // number of patches
};

inline PatchGeometry make_geometry(const at::Tensor& map, int64_t S, int64_t P) {
  PatchGeometry g;
  g.N = map.size(0);
  g.C = map.size(1);
  g.H = map.size(2);
  g.W = map.size(3);
  g.S = S;
  g.Hp = ceil_div(g.H, S);
  g.Wp = ceil_div(g.W, S);
  g.P = P;
  return g;
}

inline PatchGeometry check_scatter_args(const at::Tensor& residual, const at::Tensor& packed,
                                        const at::Tensor& indices, const char* op) {
  check_dim(residual, 4, op, "residual");
  check_dim(packed, 4, op, "packed");
  check_floating(residual, op, "residual");
  check_same_dtype(residual, packed, op, "residual", "packed");
  check_same_device(residual, packed, op, "residual", "packed");
  check_same_device(residual, indices, op, "residual", "indices");
  check_indices_shape(indices, op);
  const int64_t S = packed.size(2);
  TORCH_CHECK(S >= 1, op, ": patch size (packed.size(2)) must be at least 1, got ", S);
  TORCH_CHECK(packed.size(3) == S, op, ": packed must have shape (P, C, S, S), got ", packed.sizes());
  TORCH_CHECK(packed.size(1) == residual.size(1), op, ": packed has ", packed.size(1),
              " channels but residual has ", residual.size(1));
  TORCH_CHECK(packed.size(0) == indices.size(0), op, ": packed holds ", packed.size(0),
              " patches but indices has ", indices.size(0), " rows");
  return make_geometry(residual, S, indices.size(0));
}

inline PatchGeometry check_gather_args(const at::Tensor& x, const at::Tensor& indices,
                                       int64_t patch_size, const char* op) {
  check_dim(x, 4, op, "x");
  check_floating(x, op, "x");
  check_same_device(x, indices, op, "x", "indices");
  check_indices_shape(indices, op);
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be at least 1, got ", patch_size);
  return make_geometry(x, patch_size, indices.size(0));
}

}  // namespace laudnet_ops
