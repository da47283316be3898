// See vec_loops.h. No ATen headers here: this file only holds the loops.
#include "vec_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LAUDNET_OPS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LAUDNET_OPS_CLONES
#endif

namespace laudnet_ops {
namespace cpu {

LAUDNET_OPS_CLONES void add_floats(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

LAUDNET_OPS_CLONES void add2_floats(float* __restrict__ dst, const float* __restrict__ a,
                                    const float* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += a[i] + b[i];
}

LAUDNET_OPS_CLONES void bias_act_floats(float* __restrict__ v, const float* __restrict__ bias, int64_t n,
                                        bool relu) {
  if (bias != nullptr && relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float t = v[i] + bias[i];
      v[i] = t < 0.f ? 0.f : t;
    }
  } else if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) v[i] += bias[i];
  } else if (relu) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] < 0.f ? 0.f : v[i];
  }
}

LAUDNET_OPS_CLONES void scatter_bias_act_floats(float* __restrict__ dst, const float* __restrict__ src,
                                                const int32_t* __restrict__ idx, const float* __restrict__ bias,
                                                int64_t n, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float t = src[i] + bias[i];
      dst[idx[i]] = t < 0.f ? 0.f : t;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[idx[i]] = src[i] + bias[i];
  }
}

LAUDNET_OPS_CLONES void scatter4_bias_act_floats(float* __restrict__ dst, const float* __restrict__ src,
                                                 const int32_t* __restrict__ place4, const float* __restrict__ bias,
                                                 int64_t units, bool relu) {
  for (int64_t u = 0; u < units; ++u) {
    float* d = dst + place4[u];
    const float* s = src + 4 * u;
    const float* b = bias + 4 * u;
    for (int k = 0; k < 4; ++k) {
      const float t = s[k] + b[k];
      d[k] = relu && t < 0.f ? 0.f : t;
    }
  }
}

LAUDNET_OPS_CLONES float dot_floats(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  // Eight partial sums: the loop vectorises without reassociating a single sum.
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int k = 0; k < 8; ++k) sum += part[k];
  return sum;
}

}  // namespace cpu
}  // namespace laudnet_ops
