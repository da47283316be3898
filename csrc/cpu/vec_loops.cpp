// See vec_loops.h. No ATen headers here: this file only holds the loops.
#include "vec_loops.h"

#include <cstring>

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

namespace {
template <bool kRelu>
inline float act(float t) {
  return kRelu && t < 0.f ? 0.f : t;
}

// The residual add with every pointer restrict-qualified, so it vectorises without an overlap test.
template <bool kRelu>
inline void residual_in_place(float* __restrict__ r, const float* __restrict__ v, const float* __restrict__ bias,
                              int64_t n) {
  if (bias != nullptr)
    for (int64_t i = 0; i < n; ++i) r[i] = act<kRelu>(r[i] + v[i] + bias[i]);
  else
    for (int64_t i = 0; i < n; ++i) r[i] = act<kRelu>(r[i] + v[i]);
}

template <bool kRelu>
inline void residual_out_of_place(float* __restrict__ dst, const float* __restrict__ res,
                                  const float* __restrict__ v, const float* __restrict__ bias, int64_t n) {
  if (bias != nullptr)
    for (int64_t i = 0; i < n; ++i) dst[i] = act<kRelu>(res[i] + v[i] + bias[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = act<kRelu>(res[i] + v[i]);
}
}  // namespace

LAUDNET_OPS_CLONES void residual_bias_act_floats(float* dst, const float* res, const float* v, const float* bias,
                                                 int64_t n, bool relu) {
  if (dst == res) {
    if (relu)
      residual_in_place<true>(dst, v, bias, n);
    else
      residual_in_place<false>(dst, v, bias, n);
  } else if (relu) {
    residual_out_of_place<true>(dst, res, v, bias, n);
  } else {
    residual_out_of_place<false>(dst, res, v, bias, n);
  }
}

LAUDNET_OPS_CLONES void residual_act_sum_floats(float* __restrict__ r, const float* __restrict__ v,
                                                float* __restrict__ sum, int64_t n, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      r[i] = act<true>(r[i] + v[i]);
      sum[i] += r[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      r[i] += v[i];
      sum[i] += r[i];
    }
  }
}

// Bias and activation first, as one contiguous pass the compiler vectorises, then the scatter: a
// compare inside the scatter loop compiles to a branch, mispredicted on about half of the values.
LAUDNET_OPS_CLONES void scatter_bias_act_floats(float* __restrict__ dst, float* __restrict__ src,
                                                const int32_t* __restrict__ idx, const float* __restrict__ bias,
                                                int64_t n, bool relu) {
  bias_act_floats(src, bias, n, relu);
  for (int64_t i = 0; i < n; ++i) dst[idx[i]] = src[i];
}

LAUDNET_OPS_CLONES void scatter4_bias_act_floats(float* __restrict__ dst, float* __restrict__ src,
                                                 const int32_t* __restrict__ place4, const float* __restrict__ bias,
                                                 int64_t units, bool relu) {
  bias_act_floats(src, bias, 4 * units, relu);
  for (int64_t u = 0; u < units; ++u) std::memcpy(dst + place4[u], src + 4 * u, 4 * sizeof(float));
}

LAUDNET_OPS_CLONES void scatter_add_floats(float* __restrict__ dst, const float* __restrict__ src,
                                           const int32_t* __restrict__ idx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[idx[i]] += src[i];
}

LAUDNET_OPS_CLONES void scatter4_add_floats(float* __restrict__ dst, const float* __restrict__ src,
                                            const int32_t* __restrict__ place4, int64_t units) {
  for (int64_t u = 0; u < units; ++u) {
    float* d = dst + place4[u];
    const float* s = src + 4 * u;
    for (int k = 0; k < 4; ++k) d[k] += s[k];
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
