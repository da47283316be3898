// See vec_loops.h. No ATen headers here: this file only holds the loops.
#include "vec_loops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
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

// A select, not a product: 0 * NaN would be NaN. No restrict: dst may be src.
LAUDNET_OPS_CLONES void gate_floats(float* dst, const float* src, const float* keep, int64_t n, bool relu) {
  if (relu)
    for (int64_t i = 0; i < n; ++i) dst[i] = keep[i] != 0.f ? act<true>(src[i]) : 0.f;
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = keep[i] != 0.f ? src[i] : 0.f;
}

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

LAUDNET_OPS_CLONES void bias_act_sum_floats(float* __restrict__ v, const float* __restrict__ bias,
                                            float* __restrict__ sum, int64_t n, bool relu) {
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float t = relu ? act<true>(v[i] + bias[i]) : v[i] + bias[i];
      v[i] = t;
      sum[i] += t;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float t = relu ? act<true>(v[i]) : v[i];
      v[i] = t;
      sum[i] += t;
    }
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

namespace {
template <bool kRelu, bool kAccumulate>
void expand_rows_portable(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                          const uint16_t* keep, const float* bias, int64_t channels) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * ld_dst;
    const float* s = src + r * ld_src;
    for (int64_t c = 0; c < channels; ++c) {
      float v = 0.f;
      if ((keep[c >> 4] >> (c & 15)) & 1) v = bias != nullptr ? *s++ + bias[c] : *s++;
      d[c] = act<kRelu>(kAccumulate ? d[c] + v : v);
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LAUDNET_OPS_HAVE_AVX512_EXPAND 1
// A pixel's kept channels are spread over its row by a mask that is the same for every pixel of a
// sample: one masked expand per 16 channels places them and zeroes the rest, where a compiled
// scatter needed a zero fill of the row and a store per kept run.
template <bool kRelu, bool kAccumulate>
__attribute__((target("avx512f"))) void expand_rows_avx512(float* dst, int64_t ld_dst, const float* src,
                                                           int64_t ld_src, int64_t rows, const uint16_t* keep,
                                                           const float* bias, int64_t channels) {
  const int64_t chunks = (channels + 15) / 16;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * ld_dst;
    const float* s = src + r * ld_src;
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t lanes = std::min<int64_t>(16, channels - 16 * q);
      const __mmask16 in_row = static_cast<__mmask16>((1u << lanes) - 1);
      const __mmask16 kept = keep[q];
      const int n = __builtin_popcount(kept);
      __m512 v = _mm512_maskz_expand_ps(kept, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), s));
      s += n;
      if (bias != nullptr) v = _mm512_maskz_add_ps(kept, v, _mm512_maskz_loadu_ps(in_row, bias + 16 * q));
      if (kAccumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(in_row, d + 16 * q), v);
      // max(0, v) returns v when v is NaN: relu keeps NaN, as torch.relu does.
      if (kRelu) v = _mm512_mask_max_ps(v, in_row, zero, v);
      _mm512_mask_storeu_ps(d + 16 * q, in_row, v);
    }
  }
}

// ATEN_CPU_CAPABILITY=default or avx2 holds ATen's own kernels below AVX-512; this loop follows it,
// which is also how the portable loop is tested on an AVX-512 machine.
bool use_avx512_expand() {
  static const bool use = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && (std::strcmp(cap, "default") == 0 || std::strcmp(cap, "avx2") == 0)) return false;
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return use;
}
#else
#define LAUDNET_OPS_HAVE_AVX512_EXPAND 0
#endif

template <bool kRelu, bool kAccumulate>
void expand_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, const uint16_t* keep,
                 const float* bias, int64_t channels) {
#if LAUDNET_OPS_HAVE_AVX512_EXPAND
  if (use_avx512_expand())
    return expand_rows_avx512<kRelu, kAccumulate>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
#endif
  expand_rows_portable<kRelu, kAccumulate>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
}
}  // namespace

void expand_bias_act_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                          const uint16_t* keep, const float* bias, int64_t channels, bool relu, bool accumulate) {
  if (relu && accumulate)
    expand_rows<true, true>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
  else if (relu)
    expand_rows<true, false>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
  else if (accumulate)
    expand_rows<false, true>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
  else
    expand_rows<false, false>(dst, ld_dst, src, ld_src, rows, keep, bias, channels);
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
