// Index tensors this library made and nobody has changed since (see known_indices.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace laudnet_ops {

// Records t, just returned by patch_indices or sample_gather, as valid for a grid of `extent`
// ((N, Hp, Wp) patch rows; (N,) samples): every entry inside it, no two entries alike.
void remember_indices(const at::Tensor& t, std::vector<int64_t> extent);

// Whether t is such a tensor -- the same object, its version counter unchanged -- whose grid fits
// inside `extent` (same rank, no larger along any axis): then its entries are valid for `extent` too.
bool known_indices(const at::Tensor& t, c10::IntArrayRef extent);

}  // namespace laudnet_ops
