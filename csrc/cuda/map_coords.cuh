// Element coordinates of an (N, C, H, W) map stored contiguous or channels_last:
// the kernels that walk a map in memory order decode each element's (n, c, y, x).
#pragma once

#include <cstdint>

namespace laudnet_ops {
namespace cuda {

struct Coord {
  int64_t n, c, y, x;
};

// Coordinates of element k of an (N, C, H, W) tensor stored in the given layout.
template <bool kChannelsLast>
__device__ inline Coord decode(int64_t k, int64_t C, int64_t H, int64_t W) {
  Coord q;
  if (kChannelsLast) {
    q.c = k % C;
    k /= C;
    q.x = k % W;
    k /= W;
    q.y = k % H;
    q.n = k / H;
  } else {
    q.x = k % W;
    k /= W;
    q.y = k % H;
    k /= H;
    q.c = k % C;
    q.n = k / C;
  }
  return q;
}

template <bool kChannelsLast>
__device__ inline int64_t offset(const Coord& q, int64_t C, int64_t H, int64_t W) {
  return kChannelsLast ? ((q.n * H + q.y) * W + q.x) * C + q.c : ((q.n * C + q.c) * H + q.y) * W + q.x;
}

}  // namespace cuda
}  // namespace laudnet_ops
