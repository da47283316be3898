// CPU kernel of masker_conv1x1: the block's first 1x1 convolution and the
// pooled spatial-masker logits from one pass over x.
//
// The map is cut into bands of input rows, one band per mask-grid row (the
// window = S * stride rows that a row of mask cells averages), so each task
// owns whole rows of logits and needs no atomics or per-thread partial maps.
// For a chunk of consecutive bands of one sample:
//   1. one GEMM y_chunk = x_chunk . W, written into y itself (row_gemm.h),
//      with bias + activation applied to each block of rows while it is in L1;
//   2. the masker on the same x_chunk, pooled block by block while it is in
//      cache -- x is read from memory once. Contiguous: a thin GEMM
//      m_chunk = Wm . x_chunk (M rows), whose values are summed into their mask cells. Channels_last: x's pixels are
//      summed into their cells first, then M dot products per cell (pooling
//      and the 1x1 convolution commute).
//   3. each cell's sum is divided by its clipped area and the mask bias added
//      once (the mean of w.x + b is w.mean(x) + b).
// Rather than one GEMM with [W; Wm] appended: that would need a
// (pixels x Cout + M) scratch and a copy of the Cout columns into y, where
// here the big GEMM writes y directly and the masker costs ~1/Cout of it.
//
// Channels_last (the fast path): a chunk is a contiguous run of pixel rows
// (pixels x Cin). Contiguous: a chunk is a column range of x[n] (Cin x H*W).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../activation.h"
#include "../spatial_conv.h"
#include "row_gemm.h"
#include "vec_loops.h"
#include "weight_layout.h"

namespace laudnet_ops {
namespace {

// Bytes of x per chunk: small enough that the chunk is still in a 1 MB L2
// when the masker reads it again, large enough for an efficient GEMM.
constexpr int64_t kChunkBytes = 512 * 1024;

struct BandChunking {
  int64_t bands_per_chunk, chunks_per_sample;
};

BandChunking make_band_chunking(const MaskerGeometry& g, int64_t elem_size) {
  const int64_t pixels_wanted = std::max<int64_t>(64, kChunkBytes / (elem_size * std::max<int64_t>(1, g.Cin)));
  BandChunking c;
  c.bands_per_chunk = std::max<int64_t>(1, pixels_wanted / std::max<int64_t>(1, g.window * g.W));
  c.chunks_per_sample = ceil_div(g.Hq, c.bands_per_chunk);
  return c;
}

// One chunk: sample n, mask rows [qy0, qy1), input rows [h0, h1).
struct Chunk {
  int64_t n, qy0, qy1, h0, h1;
};

Chunk chunk_at(int64_t t, const BandChunking& bc, const MaskerGeometry& g) {
  Chunk c;
  c.n = t / bc.chunks_per_sample;
  c.qy0 = (t % bc.chunks_per_sample) * bc.bands_per_chunk;
  c.qy1 = std::min(g.Hq, c.qy0 + bc.bands_per_chunk);
  c.h0 = c.qy0 * g.window;
  c.h1 = std::min(g.H, c.qy1 * g.window);
  return c;
}

// qx of every input column, so the per-pixel pooling loop does no division.
std::vector<int64_t> column_cells(const MaskerGeometry& g) {
  std::vector<int64_t> cells(g.W);
  for (int64_t w = 0; w < g.W; ++w) cells[w] = w / g.window;
  return cells;
}

// Writes logits[n, m, qy, qx] = sums / area + mask_bias for the chunk's mask rows.
template <typename scalar_t, typename acc_t>
void write_logits(const std::vector<acc_t>& sums, const Chunk& c, const scalar_t* mask_bias,
                  const MaskerGeometry& g, scalar_t* logits, const int64_t* st) {
  for (int64_t qy = c.qy0; qy < c.qy1; ++qy) {
    for (int64_t qx = 0; qx < g.Wq; ++qx) {
      const acc_t area = acc_t(g.cell_rows(qy) * g.cell_cols(qx));
      const acc_t* cell = sums.data() + ((qy - c.qy0) * g.Wq + qx) * g.M;
      for (int64_t m = 0; m < g.M; ++m) {
        const acc_t b = mask_bias != nullptr ? acc_t(mask_bias[m]) : acc_t(0);
        logits[c.n * st[0] + m * st[1] + qy * st[2] + qx * st[3]] = scalar_t(cell[m] / area + b);
      }
    }
  }
}

template <typename scalar_t, Activation A>
void bias_act(scalar_t* v, int64_t len, const scalar_t* bias_or_null, int64_t bias_step) {
  using acc_t = at::opmath_type<scalar_t>;
  if (bias_or_null == nullptr) {
    if (A == Activation::kNone) return;
    for (int64_t k = 0; k < len; ++k) v[k] = activate<A>(acc_t(v[k]));
  } else if (bias_step == 1) {
    for (int64_t k = 0; k < len; ++k) v[k] = activate<A>(acc_t(v[k]) + acc_t(bias_or_null[k]));
  } else {
    const acc_t b = acc_t(*bias_or_null);
    for (int64_t k = 0; k < len; ++k) v[k] = activate<A>(acc_t(v[k]) + b);
  }
}

template <typename acc_t, typename scalar_t>
acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * acc_t(b[i]);
  return sum;
}
inline float dot(const float* a, const float* b, int64_t n) { return cpu::dot_floats(a, b, n); }

struct MaskerTensors {
  at::Tensor x, weight, mask_weight, y, logits;
  const void* bias;
  const void* mask_bias;
};

template <typename scalar_t, Activation A>
void masker_nhwc(const MaskerTensors& t, const MaskerGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const BandChunking bc = make_band_chunking(g, sizeof(scalar_t));
  const at::Tensor x2d = t.x.permute({0, 2, 3, 1}).reshape({g.N * g.H * g.W, g.Cin});
  at::Tensor y2d = t.y.permute({0, 2, 3, 1}).view({g.N * g.H * g.W, g.Cout});
  // (Cin, Cout) row-major
  const at::Tensor wt = cpu::taps_major_weight(t.weight, 1);
  const scalar_t* wm = t.mask_weight.data_ptr<scalar_t>();  // (M, Cin) contiguous
  const auto* bias = static_cast<const scalar_t*>(t.bias);
  const auto* mask_bias = static_cast<const scalar_t*>(t.mask_bias);
  scalar_t* logits = t.logits.data_ptr<scalar_t>();
  const int64_t st[4] = {t.logits.stride(0), t.logits.stride(1), t.logits.stride(2), t.logits.stride(3)};
  const std::vector<int64_t> qx_of = column_cells(g);
  at::parallel_for(0, g.N * bc.chunks_per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pooled, sums;
    for (int64_t k = begin; k < end; ++k) {
      const Chunk c = chunk_at(k, bc, g);
      const int64_t row0 = (c.n * g.H + c.h0) * g.W, pixels = (c.h1 - c.h0) * g.W;
      const at::Tensor xc = x2d.narrow(0, row0, pixels);
      scalar_t* yp = y2d.data_ptr<scalar_t>() + row0 * g.Cout;
      // Pool first, then the masker's dot products (they commute): per pixel a
      // vectorised add of its Cin channels into its cell. Both that and bias +
      // activation run on each block of GEMM rows while it is in L1. A GEMM with
      // M (1 or 2) output columns would run at a fraction of the micro-kernel's
      // speed in this orientation.
      const int64_t cells = (c.qy1 - c.qy0) * g.Wq;
      pooled.assign(cells * g.Cin, acc_t(0));
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      cpu::gemm_rowmajor_rows(pixels, g.Cout, g.Cin, xp, g.Cin, wt.data_ptr<scalar_t>(), g.Cout, yp, g.Cout,
                              [&](int64_t r0, int64_t rows) {
                                for (int64_t r = r0; r < r0 + rows; ++r)
                                  cpu::bias_act(yp + r * g.Cout, bias, g.Cout, A == Activation::kRelu);
                                for (int64_t r = r0; r < r0 + rows;) {
                                  const int64_t h = c.h0 + r / g.W, w = r % g.W;
                                  const int64_t cell = (h / g.window - c.qy0) * g.Wq + qx_of[w];
                                  acc_t* dst = pooled.data() + cell * g.Cin;
                                  // Two neighbours of one cell per pass over the cell's sums.
                                  if (r + 1 < r0 + rows && w + 1 < g.W && qx_of[w + 1] == qx_of[w]) {
                                    cpu::accumulate2(dst, xp + r * g.Cin, xp + (r + 1) * g.Cin, g.Cin);
                                    r += 2;
                                  } else {
                                    cpu::accumulate(dst, xp + r * g.Cin, g.Cin);
                                    r += 1;
                                  }
                                }
                              });
      sums.assign(cells * g.M, acc_t(0));
      for (int64_t cell = 0; cell < cells; ++cell) {
        for (int64_t m = 0; m < g.M; ++m) {
          const scalar_t* wrow = wm + m * g.Cin;
          const acc_t* prow = pooled.data() + cell * g.Cin;
          sums[cell * g.M + m] = dot(prow, wrow, g.Cin);
        }
      }
      write_logits(sums, c, mask_bias, g, logits, st);
    }
    cpu::gemm_release<scalar_t>();
  });
}

template <typename scalar_t, Activation A>
void masker_nchw(const MaskerTensors& t, const MaskerGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const BandChunking bc = make_band_chunking(g, sizeof(scalar_t));
  const int64_t HW = g.H * g.W;
  const at::Tensor x3d = t.x.view({g.N, g.Cin, HW});
  at::Tensor y3d = t.y.view({g.N, g.Cout, HW});
  const at::Tensor w2d = t.weight.reshape({g.Cout, g.Cin}).contiguous();
  const at::Tensor wm2d = t.mask_weight.view({g.M, g.Cin});
  const auto* bias = static_cast<const scalar_t*>(t.bias);
  const auto* mask_bias = static_cast<const scalar_t*>(t.mask_bias);
  scalar_t* logits = t.logits.data_ptr<scalar_t>();
  const int64_t st[4] = {t.logits.stride(0), t.logits.stride(1), t.logits.stride(2), t.logits.stride(3)};
  const int64_t max_pixels = bc.bands_per_chunk * g.window * g.W;
  const std::vector<int64_t> qx_of = column_cells(g);
  at::parallel_for(0, g.N * bc.chunks_per_sample, 1, [&](int64_t begin, int64_t end) {
    at::Tensor mbuf = at::empty({g.M, max_pixels}, t.x.options());
    std::vector<acc_t> sums;
    for (int64_t k = begin; k < end; ++k) {
      const Chunk c = chunk_at(k, bc, g);
      const int64_t col0 = c.h0 * g.W, pixels = (c.h1 - c.h0) * g.W;
      const at::Tensor xc = x3d[c.n].narrow(1, col0, pixels);
      scalar_t* yp = y3d.data_ptr<scalar_t>() + c.n * g.Cout * HW + col0;
      cpu::gemm_rowmajor(g.Cout, pixels, g.Cin, w2d.data_ptr<scalar_t>(), g.Cin, xc.data_ptr<scalar_t>(), HW, yp, HW);
      for (int64_t co = 0; co < g.Cout; ++co)
        bias_act<scalar_t, A>(yp + co * HW, pixels, bias == nullptr ? nullptr : bias + co, 0);
      scalar_t* mp = mbuf.data_ptr<scalar_t>();
      cpu::gemm_rowmajor(g.M, pixels, g.Cin, wm2d.data_ptr<scalar_t>(), g.Cin, xc.data_ptr<scalar_t>(), HW, mp,
                         max_pixels);
      sums.assign((c.qy1 - c.qy0) * g.Wq * g.M, acc_t(0));
      for (int64_t m = 0; m < g.M; ++m) {
        for (int64_t h = c.h0; h < c.h1; ++h) {
          acc_t* cell_row = sums.data() + (h / g.window - c.qy0) * g.Wq * g.M + m;
          const scalar_t* m_row = mp + m * max_pixels + (h - c.h0) * g.W;
          for (int64_t w = 0; w < g.W; ++w) cell_row[qx_of[w] * g.M] += acc_t(m_row[w]);
        }
      }
      write_logits(sums, c, mask_bias, g, logits, st);
    }
    cpu::gemm_release<scalar_t>();
  });
}

std::tuple<at::Tensor, at::Tensor> masker_conv1x1_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias,
                                                      const at::Tensor& mask_weight,
                                                      const c10::optional<at::Tensor>& mask_bias,
                                                      int64_t patch_size, int64_t stride,
                                                      c10::string_view activation) {
  const char* op = "masker_conv1x1";
  const MaskerGeometry g = check_masker_args(x, weight, bias, mask_weight, mask_bias, patch_size, stride, op);
  const Activation act = parse_activation(activation, op);
  const at::MemoryFormat layout = feature_layout(x);
  const auto opts = x.options().memory_format(layout);
  MaskerTensors t;
  t.x = x.contiguous(layout);
  t.weight = weight;  // each layout path arranges it as it reads it
  t.mask_weight = mask_weight.contiguous();
  t.y = at::empty({g.N, g.Cout, g.H, g.W}, opts);
  t.logits = at::empty({g.N, g.M, g.Hq, g.Wq}, opts);
  if (g.N * g.H * g.W == 0) return {t.y, t.logits};
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bias.has_value() && mask_bias->defined() ? mask_bias->contiguous() : at::Tensor();
  t.bias = b.defined() ? b.data_ptr() : nullptr;
  t.mask_bias = mb.defined() ? mb.data_ptr() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "masker_conv1x1_cpu", [&] {
    with_activation(act, [&](auto A) {
      if (layout == at::MemoryFormat::ChannelsLast)
        masker_nhwc<scalar_t, decltype(A)::value>(t, g);
      else
        masker_nchw<scalar_t, decltype(A)::value>(t, g);
    });
  });
  return {t.y, t.logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) { m.impl("masker_conv1x1", &masker_conv1x1_cpu); }

}  // namespace laudnet_ops
