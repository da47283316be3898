// CPU kernel of gather_conv2d: a convolution evaluated only on the kept
// S x S output patches.
//
// Each task walks a run of chunks; a chunk is a few patches (about kChunkRows
// output positions). For a chunk, the receptive fields of its positions are
// gathered -- zero padding and the halo handled here -- into a buffer owned
// by the task, and one GEMM per group with the reshaped weight produces the
// outputs; bias, activation and the zeroing of border positions are the
// epilogue. The buffer is tile-sized: kChunkRows x (k*k*Cin) elements per
// thread, reused for every chunk, so memory does not grow with P or with the
// map (no gathered input, no map-sized im2col). Several patches per GEMM
// matter for S = 1 and 2, whose single tiles are 1 and 4 rows: too small for
// a GEMM call to pay off.
//
// Reductions longer than kMaxBlockedK (3x3 over 512 channels without groups)
// take a second path: there every per-thread chunk would stream a weight of
// 9 MB and more from memory again. Those chunks are larger (kWideChunkBytes of
// gathered rows), gathered by all threads, and multiplied by all threads at
// once, each owning whole 64-column panels of the output, so that the weight
// is read once per chunk (cpu::gemm_rowmajor_panels).
//
// The gather reads x in channels_last, so that each kernel tap of a position
// is one contiguous copy of Cin channels. With channels_last packed (the fast
// path) the GEMM writes straight into the output, whose (P * S * S, Cout) rows
// are exactly the GEMM's rows. A contiguous x is first copied to channels_last
// -- one pass over the map, as oneDNN's dense convolution reorders its input
// too -- and the epilogue transposes each tile into packed's (Cout, S, S);
// gathering from NCHW directly would read one element per channel plane and
// tap, several times slower than that copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>

#include "../activation.h"
#include "../spatial_conv.h"
#include "patch_grid.h"
#include "row_gemm.h"
#include "vec_loops.h"
#include "weight_layout.h"

namespace laudnet_ops {
namespace {

// Output positions per chunk: several 64-row micro-kernel blocks per weight
// panel, while the gathered block stays about L2-sized; down to one block per
// chunk when that is what it takes to give every thread a few chunks.
constexpr int64_t kChunkRows = 256;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kChunksPerThread = 4;

// Above this reduction length (k*k*Cin/groups) each per-thread chunk's product
// would stream the whole (large) weight again: such convolutions gather larger
// chunks and multiply each by all threads, output panel by output panel. Below
// it the per-thread path wins, its long reductions cut into L2-sized blocks
// (row_gemm.h). Measured at batch 8 on half the patches: 14x14, 256 channels,
// S = 2: 4.0-4.1 ms per thread against 4.2 ms by panels; 28x28, 128 channels,
// S = 4: 4.6-4.7 against 5.4 ms. With 512 channels (7x7, S = 1) the panels
// path took 5.4 ms, where the earlier multi-threaded at::mm took 5.8.
constexpr int64_t kMaxBlockedK = 4096;
// Gathered rows per chunk on that path: at most this many bytes.
constexpr int64_t kWideChunkBytes = 8 << 20;

struct Chunking {
  int64_t patches_per_chunk, chunks, max_rows;
};

Chunking make_chunking(const GatherConvGeometry& g, int64_t rows_wanted) {
  Chunking c;
  c.patches_per_chunk = std::max<int64_t>(1, rows_wanted / (g.S * g.S));
  c.chunks = ceil_div(g.P, c.patches_per_chunk);
  c.max_rows = c.patches_per_chunk * g.S * g.S;
  return c;
}

// Per-thread chunks: up to kChunkRows rows, fewer when P is small; as many chunks as a multiple
// of the thread count allows, so that no core is left one chunk behind the others (9 chunks on 2
// threads took 5 chunk-times instead of 4.5: a 256-channel stride-2 conv took 5.7 ms, now 4.5-4.9).
Chunking thread_chunking(const GatherConvGeometry& g) {
  const int64_t threads = at::get_num_threads(), SS = g.S * g.S;
  const int64_t per_chunk = std::clamp<int64_t>(ceil_div(g.P * SS, kChunksPerThread * threads), kMinChunkRows,
                                                kChunkRows);
  const int64_t chunks = ceil_div(ceil_div(g.P * SS, per_chunk), threads) * threads;
  return make_chunking(g, ceil_div(g.P, chunks) * SS);
}

bool wide_reduction(const GatherConvGeometry& g) { return g.groups == 1 && g.K * g.K * g.Cg > kMaxBlockedK; }

// Input coordinate read by output coordinate o through kernel tap t.
inline int64_t input_coord(int64_t o, int64_t t, const GatherConvGeometry& g) {
  return o * g.stride - g.padding + t * g.dilation;
}

// ---------------------------------------------------------------- channels_last

// A[r, (grp, kh, kw, c)] = x[n, grp*Cg + c, iy, ix] for output position r of patches [p0, p1).
template <typename scalar_t>
void gather_rows_nhwc(const scalar_t* x, const int32_t* idx, int64_t p0, int64_t p1,
                      const GatherConvGeometry& g, scalar_t* A) {
  const int64_t S = g.S, K = g.K, Cg = g.Cg, KKCg = K * K * Cg, row_len = g.groups * KKCg;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = idx[3 * p], oy0 = idx[3 * p + 1] * S, ox0 = idx[3 * p + 2] * S;
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t j = 0; j < S; ++j) {
        scalar_t* row = A + ((p - p0) * S * S + i * S + j) * row_len;
        const int64_t oy = oy0 + i, ox = ox0 + j;
        if (oy >= g.Ho || ox >= g.Wo) {  // the part of a border patch outside the map
          std::fill(row, row + row_len, scalar_t(0));
          continue;
        }
        for (int64_t kh = 0; kh < K; ++kh) {
          const int64_t iy = input_coord(oy, kh, g);
          for (int64_t kw = 0; kw < K; ++kw) {
            const int64_t ix = input_coord(ox, kw, g);
            const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
            const scalar_t* src = x + ((n * g.H + iy) * g.W + ix) * g.Cin;
            scalar_t* dst = row + (kh * K + kw) * Cg;
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              if (inside)
                std::copy(src + grp * Cg, src + (grp + 1) * Cg, dst + grp * KKCg);
              else
                std::fill(dst + grp * KKCg, dst + grp * KKCg + Cg, scalar_t(0));
            }
          }
        }
      }
    }
  }
}

// In place on the packed rows of patches [p0, p1): bias, activation, zero outside the map.
template <typename scalar_t, Activation A>
void epilogue_nhwc(scalar_t* out, const scalar_t* bias, const int32_t* idx, int64_t p0, int64_t p1,
                   const GatherConvGeometry& g) {
  const int64_t S = g.S, C = g.Cout;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t oy0 = idx[3 * p + 1] * S, ox0 = idx[3 * p + 2] * S;
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t j = 0; j < S; ++j) {
        scalar_t* px = out + ((p * S + i) * S + j) * C;
        if (oy0 + i >= g.Ho || ox0 + j >= g.Wo)
          std::fill(px, px + C, scalar_t(0));
        else
          cpu::bias_act(px, bias, C, A == Activation::kRelu);
      }
    }
  }
}

// packed[p, co, i, j] = act(C[row, co] + bias[co]) for packed in NCHW, zero outside the map.
template <typename scalar_t, Activation A>
void epilogue_nchw(const scalar_t* C, scalar_t* out, const scalar_t* bias, const int32_t* idx, int64_t p0,
                   int64_t p1, const GatherConvGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S, SS = S * S, Cout = g.Cout;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t oy0 = idx[3 * p + 1] * S, ox0 = idx[3 * p + 2] * S;
    const scalar_t* tile = C + (p - p0) * SS * Cout;
    for (int64_t co = 0; co < Cout; ++co) {
      scalar_t* dst = out + (p * Cout + co) * SS;
      const acc_t b = bias != nullptr ? acc_t(bias[co]) : acc_t(0);
      for (int64_t pos = 0; pos < SS; ++pos) {
        const bool inside = oy0 + pos / S < g.Ho && ox0 + pos % S < g.Wo;
        dst[pos] = inside ? scalar_t(activate<A>(acc_t(tile[pos * Cout + co]) + b)) : scalar_t(0);
      }
    }
  }
}

// Each thread gathers its own chunks and multiplies them on its own core.
template <typename scalar_t, Activation A>
void gather_conv_per_thread(const scalar_t* xp, const int32_t* idx, const scalar_t* wp, const scalar_t* bias,
                            const GatherConvGeometry& g, const at::TensorOptions& opts, bool direct,
                            scalar_t* out_p) {
  const int64_t KKCg = g.K * g.K * g.Cg, row_len = g.groups * KKCg, SS = g.S * g.S;
  const Chunking ch = thread_chunking(g);
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({ch.max_rows, row_len}, opts);
    at::Tensor scratch = direct ? at::Tensor() : at::empty({ch.max_rows, g.Cout}, opts);
    scalar_t* a = buf.data_ptr<scalar_t>();
    for (int64_t c = begin; c < end; ++c) {
      const int64_t p0 = c * ch.patches_per_chunk, p1 = std::min(g.P, p0 + ch.patches_per_chunk);
      const int64_t rows = (p1 - p0) * SS;
      gather_rows_nhwc(xp, idx, p0, p1, g, a);
      scalar_t* out = direct ? out_p + p0 * SS * g.Cout : scratch.data_ptr<scalar_t>();
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        cpu::gemm_rowmajor(rows, g.Cog, KKCg, a + grp * KKCg, row_len, wp + grp * KKCg * g.Cog, g.Cog,
                           out + grp * g.Cog, g.Cout);
      }
      if (direct)
        epilogue_nhwc<scalar_t, A>(out_p, bias, idx, p0, p1, g);
      else
        epilogue_nchw<scalar_t, A>(out, out_p, bias, idx, p0, p1, g);
    }
    cpu::gemm_release<scalar_t>();
  });
}

// The (k*k*Cin, Cout) product operand of a groups == 1 weight, row (kh, kw, c):
// a view when the weight lies as (kh, kw, Cin, Cout) or channels_last, else a copy.
at::Tensor taps_by_channels(const at::Tensor& weight, const GatherConvGeometry& g) {
  const int64_t rows = g.K * g.K * g.Cin;
  const at::Tensor per_output = weight.permute({0, 2, 3, 1});
  if (per_output.is_contiguous()) return per_output.reshape({g.Cout, rows}).t();
  return cpu::taps_major_weight(weight, 1).view({rows, g.Cout});
}

// Wide reductions (groups == 1): chunk after chunk, gathered, multiplied and
// finished by all threads, the product reading the weight once per chunk.
template <typename scalar_t, Activation A>
void gather_conv_wide(const scalar_t* xp, const int32_t* idx, const at::Tensor& wt, const scalar_t* bias,
                      const GatherConvGeometry& g, const at::TensorOptions& opts, bool direct, scalar_t* out_p) {
  const int64_t row_len = g.K * g.K * g.Cin, SS = g.S * g.S;
  const int64_t rows_wanted = kWideChunkBytes / (row_len * static_cast<int64_t>(sizeof(scalar_t)));
  const Chunking ch = make_chunking(g, std::max<int64_t>(kMinChunkRows, rows_wanted));
  at::Tensor buf = at::empty({ch.max_rows, row_len}, opts);
  at::Tensor scratch = direct ? at::Tensor() : at::empty({ch.max_rows, g.Cout}, opts);
  // wt is (k*k*Cin, Cout): row-major (the panels product), or the transpose of a row-major
  // (Cout, k*k*Cin), a channels_last weight, which BLAS reads as it is (re-laying it, or packing its
  // panels, cost 1.5 ms more per call at 512 channels than the panels saved).
  const bool row_major = wt.stride(1) == 1;
  for (int64_t c = 0; c < ch.chunks; ++c) {
    const int64_t p0 = c * ch.patches_per_chunk, p1 = std::min(g.P, p0 + ch.patches_per_chunk);
    const int64_t rows = (p1 - p0) * SS;
    scalar_t* a = buf.data_ptr<scalar_t>();
    at::parallel_for(p0, p1, 1, [&](int64_t pa, int64_t pb) {
      gather_rows_nhwc(xp, idx, pa, pb, g, a + (pa - p0) * SS * row_len);
    });
    scalar_t* tile = direct ? out_p + p0 * SS * g.Cout : scratch.data_ptr<scalar_t>();
    if (row_major) {
      cpu::gemm_rowmajor_panels(rows, g.Cout, row_len, a, row_len, wt.data_ptr<scalar_t>(), wt.stride(0), tile,
                                g.Cout);
    } else {
      at::Tensor out = at::from_blob(tile, {rows, g.Cout}, opts);
      at::mm_out(out, buf.narrow(0, 0, rows), wt);
    }
    at::parallel_for(p0, p1, 1, [&](int64_t pa, int64_t pb) {
      if (direct)
        epilogue_nhwc<scalar_t, A>(out_p, bias, idx, pa, pb, g);
      else
        epilogue_nchw<scalar_t, A>(tile + (pa - p0) * SS * g.Cout, out_p, bias, idx, pa, pb, g);
    });
  }
}

template <typename scalar_t, Activation A>
void gather_conv_nhwc(const at::Tensor& x, const at::Tensor& idx_t, const at::Tensor& weight,
                      const scalar_t* bias, const GatherConvGeometry& g, at::Tensor& packed) {
  // channels_last (P, Cout, S, S) is (P*S*S, Cout) row-major: the GEMM writes into it directly.
  const bool direct = packed.is_contiguous(at::MemoryFormat::ChannelsLast);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  scalar_t* out_p = packed.data_ptr<scalar_t>();
  if (wide_reduction(g)) {
    gather_conv_wide<scalar_t, A>(xp, idx, taps_by_channels(weight, g), bias, g, x.options(), direct, out_p);
    return;
  }
  // (G, k*k*Cg, Cog): row (kh, kw, c) of group grp multiplies gathered column (grp, kh, kw, c).
  const at::Tensor wt = cpu::taps_major_weight(weight, g.groups);
  gather_conv_per_thread<scalar_t, A>(xp, idx, wt.data_ptr<scalar_t>(), bias, g, x.options(), direct, out_p);
}

at::Tensor gather_conv2d_cpu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, int64_t patch_size, int64_t stride,
                             int64_t padding, int64_t dilation, int64_t groups, c10::string_view activation) {
  const char* op = "gather_conv2d";
  const GatherConvGeometry g =
      check_gather_conv_args(x, indices, weight, bias, patch_size, stride, padding, dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  cpu::check_rows_in_range(idx, g.output_patches(), op);
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor packed = at::empty({g.P, g.Cout, g.S, g.S}, x.options().memory_format(layout));
  if (packed.numel() == 0) return packed;
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_conv2d_cpu", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    with_activation(act, [&](auto A) {
      gather_conv_nhwc<scalar_t, decltype(A)::value>(src, idx, weight, bp, g, packed);
    });
  });
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) { m.impl("gather_conv2d", &gather_conv2d_cpu); }

}  // namespace laudnet_ops
