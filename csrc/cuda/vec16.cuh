// 16-byte vectors of feature-map elements, for the memory-bound SIMT kernels.
//
// EXPERIMENTAL: compiled, never run on a GPU; the kernels that use them (row_vectors.cuh,
// scatter_add.cu) run only with the experimental switch on (tensor_core_switch.h).
//
// A thread that moves one float16 per load issues eight times the instructions of one that moves
// 16 bytes, and the one-element kernels also divide each element's flat index into coordinates.
// Vec16 holds 16 / sizeof(T) elements, is 16-byte aligned, so a load or store of one is a single
// 128-bit access; add_activate / activate_elem apply the epilogue to a scalar or to each lane alike,
// in the op's math type, so one kernel body serves both widths. They take vectors by value: a
// reference into global memory made the compiler read it lane by lane.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>

#include "../activation.h"

namespace laudnet_ops {
namespace cuda {

template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kLen = 16 / sizeof(scalar_t);
  scalar_t v[kLen];
};

template <Activation A, typename scalar_t>
__device__ __forceinline__ scalar_t add_activate(scalar_t a, scalar_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(activate<A>(acc_t(a) + acc_t(b)));
}

template <Activation A, typename scalar_t>
__device__ __forceinline__ scalar_t activate_elem(scalar_t a) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(activate<A>(acc_t(a)));
}

template <Activation A, typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> add_activate(Vec16<scalar_t> a, Vec16<scalar_t> b) {
#pragma unroll
  for (int e = 0; e < Vec16<scalar_t>::kLen; ++e) a.v[e] = add_activate<A>(a.v[e], b.v[e]);
  return a;
}

template <Activation A, typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> activate_elem(Vec16<scalar_t> a) {
#pragma unroll
  for (int e = 0; e < Vec16<scalar_t>::kLen; ++e) a.v[e] = activate_elem<A>(a.v[e]);
  return a;
}

// Whether runs of `run` elements of `elem_size` bytes, in tensors starting at 16-byte boundaries,
// split into whole vectors: then every run starts on a 16-byte boundary too.
inline bool vectorizable(int64_t run, int64_t elem_size, std::initializer_list<const at::Tensor*> tensors) {
  if ((run * elem_size) % 16 != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

template <typename scalar_t>
const Vec16<scalar_t>* vecs(const at::Tensor& t) {
  return reinterpret_cast<const Vec16<scalar_t>*>(t.data_ptr());
}

template <typename scalar_t>
Vec16<scalar_t>* mutable_vecs(const at::Tensor& t) {
  return reinterpret_cast<Vec16<scalar_t>*>(t.data_ptr());
}

}  // namespace cuda
}  // namespace laudnet_ops
