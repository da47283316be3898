// Launch geometry shared by the one-thread-per-element SIMT kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace laudnet_ops {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for n elements, capped: every kernel uses a grid-stride loop for the rest.
inline int64_t blocks_for(int64_t n) {
  const int64_t max_blocks = 65535LL * 8;
  return std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks);
}

}  // namespace cuda
}  // namespace laudnet_ops
