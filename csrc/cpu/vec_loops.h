// Float32 inner loops of the CPU kernels' epilogues, compiled once per vector
// width (AVX-512, AVX2, baseline) and picked at load time for the running CPU.
//
// The extension is built for the baseline x86-64 instruction set so that it
// runs anywhere; the GEMMs it calls are JIT-compiled for the CPU, so without
// this the bias/activation and pooling passes ran at 4 lanes beside a 16-lane
// GEMM and cost 10-15% of a 1x1 convolution on an AVX-512 machine. The one
// loop a compiler cannot vectorise, expand_bias_act_rows, is written with
// AVX-512 intrinsics and picked at run time, with a portable loop beside it.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace laudnet_ops {
namespace cpu {

// dst[i] += src[i]
void add_floats(float* dst, const float* src, int64_t n);
// dst[i] += a[i] + b[i]: two pixels of one pooling cell per pass over it.
void add2_floats(float* dst, const float* a, const float* b, int64_t n);
// v[i] = act(v[i] + bias[i]); bias may be null; relu keeps NaN like torch.relu.
void bias_act_floats(float* v, const float* bias, int64_t n, bool relu);
// Rows of a channel-gated output, each `channels` values of a channels_last pixel: the kept channels
// (bit c % 16 of keep[c / 16]) take act(src[j] + bias[c]) in order, j counting the kept channels,
// and the others 0. With accumulate, dst holds a residual: act(dst[c] + src[j] + bias[c]) on the kept
// channels and act(dst[c]) on the others. src rows hold the kept channels only, ld_src apart; bias
// (length channels) may be null. Each row of dst is written once, 16 channels at a time.
void expand_bias_act_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                          const uint16_t* keep, const float* bias, int64_t channels, bool relu, bool accumulate);
// dst[i] = act(src[i]) where keep[i] != 0, else 0 (also where src[i] is NaN or Inf); dst may be src.
void gate_floats(float* dst, const float* src, const float* keep, int64_t n, bool relu);
// dst[i] = act(res[i] + v[i] + bias[i]); bias may be null; dst may be res (in place) but no
// other overlap.
void residual_bias_act_floats(float* dst, const float* res, const float* v, const float* bias, int64_t n,
                              bool relu);
// v[i] = act(v[i] + bias[i]) and sum[i] += v[i]; bias may be null: a finished pixel pooled in the
// same pass.
void bias_act_sum_floats(float* v, const float* bias, float* sum, int64_t n, bool relu);
// r[i] = act(r[i] + v[i]) and sum[i] += r[i]: one pixel of a residual update that also pools it.
void residual_act_sum_floats(float* r, const float* v, float* sum, int64_t n, bool relu);
// sum of a[i] * b[i]
float dot_floats(const float* a, const float* b, int64_t n);

// Sums into a wider accumulator for any element type; float32 takes the dispatched loops above.
// dst[i] += src[i]
template <typename acc_t, typename scalar_t>
void accumulate(acc_t* dst, const scalar_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += acc_t(src[i]);
}
inline void accumulate(float* dst, const float* src, int64_t n) { add_floats(dst, src, n); }
// dst[i] += a[i] + b[i]
template <typename acc_t, typename scalar_t>
void accumulate2(acc_t* dst, const scalar_t* a, const scalar_t* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += acc_t(a[i]) + acc_t(b[i]);
}
inline void accumulate2(float* dst, const float* a, const float* b, int64_t n) { add2_floats(dst, a, b, n); }

// v[i] = act(v[i] + bias[i]) for any element type, in its wider math type; bias may be null.
// float32 takes the dispatched loop above.
template <typename scalar_t>
void bias_act(scalar_t* v, const scalar_t* bias, int64_t n, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  if (bias == nullptr && !relu) return;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = bias != nullptr ? acc_t(v[i]) + acc_t(bias[i]) : acc_t(v[i]);
    v[i] = scalar_t(relu && x < acc_t(0) ? acc_t(0) : x);  // keeps NaN, like torch.relu
  }
}
inline void bias_act(float* v, const float* bias, int64_t n, bool relu) { bias_act_floats(v, bias, n, relu); }

// bias_act, then sum[i] += v[i], in one pass; float32 takes the dispatched loop above.
template <typename scalar_t, typename acc_t>
void bias_act_sum(scalar_t* v, const scalar_t* bias, acc_t* sum, int64_t n, bool relu) {
  bias_act(v, bias, n, relu);
  accumulate(sum, v, n);
}
inline void bias_act_sum(float* v, const float* bias, float* sum, int64_t n, bool relu) {
  bias_act_sum_floats(v, bias, sum, n, relu);
}

}  // namespace cpu
}  // namespace laudnet_ops
