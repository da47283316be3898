// Row kernels of the layer-skipping ops on 16-byte vectors (vec16.cuh).
//
// EXPERIMENTAL: compiled, never run on a GPU; layer_skip.cu takes them only with the experimental
// switch on and keeps its one-element-per-thread kernels as the default.
//
// Why: those kernels divide each element's flat index by the row length (a 64-bit division per
// element) and move 2 bytes per load in float16. On the H200 the whole layer-skipping block ran
// slower than the dense one (0.87x at ResNet layer1.1), and its row copies of half the batch are
// the only work it adds to the dense convolutions. Here blockIdx.y walks the rows (samples), so no
// thread divides, and a thread moves 16 bytes per load and store. A call qualifies when a row's byte
// length and every tensor's base are multiples of 16 (vectorizable).
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec16.cuh"

namespace laudnet_ops {
namespace cuda {

constexpr int kRowThreads = 256;

// x: the vectors of a row, y: rows (grid-stride loops cover what the caps leave out).
inline dim3 row_grid(int64_t rows, int64_t vecs_per_row) {
  const int64_t x = std::min<int64_t>((vecs_per_row + kRowThreads - 1) / kRowThreads, 1 << 16);
  const int64_t y = std::min<int64_t>(rows, 65535);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

#define LAUDNET_ROW_LOOP(k, rows) for (int64_t k = blockIdx.y; k < (rows); k += gridDim.y)
#define LAUDNET_VEC_LOOP(v, Rv)                                                                 \
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < (Rv); \
       v += static_cast<int64_t>(gridDim.x) * blockDim.x)

// dst row k = src row rows[k] (rows checked by the caller).
template <typename scalar_t>
__global__ void copy_rows_vec_kernel(const Vec16<scalar_t>* __restrict__ src, Vec16<scalar_t>* __restrict__ dst,
                                     const int32_t* __restrict__ rows, int64_t K, int64_t Rv) {
  LAUDNET_ROW_LOOP(k, K) {
    const Vec16<scalar_t>* s = src + static_cast<int64_t>(rows[k]) * Rv;
    Vec16<scalar_t>* d = dst + k * Rv;
    LAUDNET_VEC_LOOP(v, Rv) { d[v] = s[v]; }
  }
}

// out row n = act(res row n + y row slot[n]), or act(res row n) where slot[n] < 0.
template <typename scalar_t, Activation A>
__global__ void scatter_rows_vec_kernel(const Vec16<scalar_t>* __restrict__ res, const Vec16<scalar_t>* __restrict__ y,
                                        Vec16<scalar_t>* __restrict__ out, const int32_t* __restrict__ slot,
                                        int64_t N, int64_t Rv) {
  LAUDNET_ROW_LOOP(n, N) {
    const int32_t k = slot[n];
    const Vec16<scalar_t>* r = res + n * Rv;
    Vec16<scalar_t>* o = out + n * Rv;
    if (k >= 0) {
      const Vec16<scalar_t>* add = y + static_cast<int64_t>(k) * Rv;
      LAUDNET_VEC_LOOP(v, Rv) { o[v] = add_activate<A>(r[v], add[v]); }
    } else {
      LAUDNET_VEC_LOOP(v, Rv) { o[v] = activate_elem<A>(r[v]); }
    }
  }
}

// res row sel[k] = act(res row sel[k] + y row k) (sel checked unique and in range by the caller).
template <typename scalar_t, Activation A>
__global__ void scatter_rows_inplace_vec_kernel(Vec16<scalar_t>* __restrict__ res, const Vec16<scalar_t>* __restrict__ y,
                                                const int32_t* __restrict__ sel, int64_t K, int64_t Rv) {
  LAUDNET_ROW_LOOP(k, K) {
    Vec16<scalar_t>* r = res + static_cast<int64_t>(sel[k]) * Rv;
    const Vec16<scalar_t>* add = y + k * Rv;
    LAUDNET_VEC_LOOP(v, Rv) { r[v] = add_activate<A>(r[v], add[v]); }
  }
}

#undef LAUDNET_ROW_LOOP
#undef LAUDNET_VEC_LOOP

}  // namespace cuda
}  // namespace laudnet_ops
