// CPU kernel of conv1x1_scatter_add (out of place and in place): the 1x1
// convolution of the packed patches, added to the residual with the
// activation at the positions each patch covers.
//
// Tasks walk chunks of consecutive patches. For a chunk, one GEMM of its
// positions (rows) by the (Cin, Cout) weight writes a per-thread buffer small
// enough to stay in L2 (kBufferBytes), and the epilogue -- bias, residual,
// activation -- reads it back from cache and writes the map. So the
// (P, Cout, S, S) convolution output, which the unfused pair writes to memory
// and reads back, exists only one chunk at a time; memory does not grow with P.
//
// Channels_last (the fast path): the chunk's packed rows (positions x Cin) are
// contiguous and feed the GEMM directly; each position's Cout results land as
// one contiguous pixel of the map. The weight is read as (Cin, Cout) row-major,
// free for a weight stored in "taps_major" order (what the blocks pass), one
// transposed copy per call otherwise.
// Contiguous: each patch is a (Cin, S*S) matrix, so the chunk's patches are
// copied side by side into a (Cin x rows) buffer and the GEMM is
// (Cout x Cin) . (Cin x rows); the epilogue writes runs of up to S pixels of
// one channel row. Correct, and slower: NCHW scatters short runs.
//
// Out of place, out = act(residual) at every uncovered position, written by
// one pass over the patch grid's empty cells, so each element of out is
// written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../activation.h"
#include "../conv1x1_scatter.h"
#include "patch_grid.h"
#include "row_gemm.h"

namespace laudnet_ops {
namespace {

// GEMM output per chunk: with the chunk's packed rows it stays within a
// 1 MB L2 until the epilogue has read it back.
constexpr int64_t kBufferBytes = 256 * 1024;
// Enough rows for the micro-kernel's 64-row blocks to amortise each weight panel.
constexpr int64_t kMinRows = 64;
constexpr int64_t kMaxRows = 256;

struct Chunking {
  int64_t patches_per_chunk, chunks, max_rows;
};

Chunking make_chunking(const Conv1x1ScatterGeometry& g, int64_t elem_size) {
  const int64_t SS = g.out.S * g.out.S;
  const int64_t fit = kBufferBytes / (elem_size * std::max<int64_t>(1, g.out.C));
  const int64_t rows = std::clamp<int64_t>(fit, kMinRows, kMaxRows);
  Chunking c;
  c.patches_per_chunk = std::max<int64_t>(1, rows / SS);
  c.chunks = ceil_div(g.out.P, c.patches_per_chunk);
  c.max_rows = c.patches_per_chunk * SS;
  return c;
}

// Pointers of one call. res and dst are the same map in place.
template <typename scalar_t>
struct Operands {
  const scalar_t* packed;
  const scalar_t* weight;  // (Cin, Cout) row-major for channels_last, (Cout, Cin) for contiguous
  const scalar_t* bias;    // nullptr: no bias
  const scalar_t* res;
  scalar_t* dst;
  const int32_t* idx;
};

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

// dst[c] = act(res[c] + v[c] + bias[c]) over one pixel's Cout channels.
template <typename scalar_t, Activation A>
inline void add_pixel(const scalar_t* v, const scalar_t* bias, const scalar_t* res, scalar_t* dst, int64_t C) {
  using acc_t = acc_of<scalar_t>;
  if (bias != nullptr) {
    for (int64_t c = 0; c < C; ++c) dst[c] = activate<A>(acc_t(res[c]) + acc_t(v[c]) + acc_t(bias[c]));
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = activate<A>(acc_t(res[c]) + acc_t(v[c]));
  }
}

// ---------------------------------------------------------------- channels_last

template <typename scalar_t, Activation A>
void covered_nhwc(const Operands<scalar_t>& o, const Conv1x1ScatterGeometry& geo) {
  const PatchGeometry& g = geo.out;
  const int64_t S = g.S, C = g.C, Cin = geo.Cin;
  const Chunking ch = make_chunking(geo, sizeof(scalar_t));
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buf(ch.max_rows * C);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t p0 = k * ch.patches_per_chunk, p1 = std::min(g.P, p0 + ch.patches_per_chunk);
      const int64_t rows = (p1 - p0) * S * S;
      cpu::gemm_rowmajor(rows, C, Cin, o.packed + p0 * S * S * Cin, Cin, o.weight, C, buf.data(), C);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = o.idx[3 * p], y0 = o.idx[3 * p + 1] * S, x0 = o.idx[3 * p + 2] * S;
        const int64_t h = std::min(S, g.H - y0), w = std::min(S, g.W - x0);
        for (int64_t i = 0; i < h; ++i) {
          const int64_t pix = (n * g.H + y0 + i) * g.W + x0;
          const scalar_t* v = buf.data() + (((p - p0) * S + i) * S) * C;
          for (int64_t j = 0; j < w; ++j)
            add_pixel<scalar_t, A>(v + j * C, o.bias, o.res + (pix + j) * C, o.dst + (pix + j) * C, C);
        }
      }
    }
    cpu::gemm_release<scalar_t>();
  });
}

// out = act(residual) in every grid cell no patch covers: runs of whole pixels.
template <typename scalar_t, Activation A>
void uncovered_nhwc(const scalar_t* res, scalar_t* out, const int32_t* grid, const PatchGeometry& g) {
  using acc_t = acc_of<scalar_t>;
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.N * g.H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.W * C)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* cells = grid + ((r / g.H) * g.Hp + (r % g.H) / S) * g.Wp;
      for (int64_t px = 0; px < g.Wp; ++px) {
        if (cells[px] >= 0) continue;
        const int64_t first = (r * g.W + px * S) * C, last = (r * g.W + std::min((px + 1) * S, g.W)) * C;
        for (int64_t e = first; e < last; ++e) out[e] = activate<A>(acc_t(res[e]));
      }
    }
  });
}

// ---------------------------------------------------------------- contiguous

template <typename scalar_t, Activation A>
void covered_nchw(const Operands<scalar_t>& o, const Conv1x1ScatterGeometry& geo) {
  using acc_t = acc_of<scalar_t>;
  const PatchGeometry& g = geo.out;
  const int64_t S = g.S, SS = S * S, C = g.C, Cin = geo.Cin;
  const Chunking ch = make_chunking(geo, sizeof(scalar_t));
  const int64_t ld = ch.max_rows;
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> cols(Cin * ld), buf(C * ld);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t p0 = k * ch.patches_per_chunk, p1 = std::min(g.P, p0 + ch.patches_per_chunk);
      const int64_t rows = (p1 - p0) * SS;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* patch = o.packed + p * Cin * SS;
        for (int64_t ci = 0; ci < Cin; ++ci)
          std::copy(patch + ci * SS, patch + (ci + 1) * SS, cols.data() + ci * ld + (p - p0) * SS);
      }
      cpu::gemm_rowmajor(C, rows, Cin, o.weight, Cin, cols.data(), ld, buf.data(), ld);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t b = o.bias != nullptr ? acc_t(o.bias[c]) : acc_t(0);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = o.idx[3 * p], y0 = o.idx[3 * p + 1] * S, x0 = o.idx[3 * p + 2] * S;
          const int64_t h = std::min(S, g.H - y0), w = std::min(S, g.W - x0);
          for (int64_t i = 0; i < h; ++i) {
            const int64_t off = ((n * C + c) * g.H + y0 + i) * g.W + x0;
            const scalar_t* v = buf.data() + c * ld + (p - p0) * SS + i * S;
            const scalar_t* r = o.res + off;
            scalar_t* d = o.dst + off;
            for (int64_t j = 0; j < w; ++j) d[j] = activate<A>(acc_t(r[j]) + acc_t(v[j]) + b);
          }
        }
      }
    }
    cpu::gemm_release<scalar_t>();
  });
}

template <typename scalar_t, Activation A>
void uncovered_nchw(const scalar_t* res, scalar_t* out, const int32_t* grid, const PatchGeometry& g) {
  using acc_t = acc_of<scalar_t>;
  const int64_t S = g.S, W = g.W;
  at::parallel_for(0, g.N * g.C * g.H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % g.H, n = r / (g.H * g.C);
      const int32_t* cells = grid + (n * g.Hp + y / S) * g.Wp;
      for (int64_t px = 0; px < g.Wp; ++px) {
        if (cells[px] >= 0) continue;
        for (int64_t x = px * S; x < std::min((px + 1) * S, W); ++x) out[r * W + x] = activate<A>(acc_t(res[r * W + x]));
      }
    }
  });
}

// ---------------------------------------------------------------- entry points

// The weight as the GEMM reads it; a view (no copy) when it is already stored that way.
at::Tensor gemm_weight(const at::Tensor& weight, at::MemoryFormat layout) {
  const at::Tensor w2d = weight.squeeze(3).squeeze(2);  // (Cout, Cin)
  return layout == at::MemoryFormat::ChannelsLast ? w2d.t().contiguous() : w2d.contiguous();
}

at::Tensor bias_or_undefined(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
}

// Runs the patch part: dst = act(res + conv1x1(packed) + bias) at the covered positions.
void run_covered(const at::Tensor& res, at::Tensor& dst, const at::Tensor& packed, const at::Tensor& idx,
                 const at::Tensor& weight, const at::Tensor& bias, at::MemoryFormat layout, Activation act,
                 const Conv1x1ScatterGeometry& g) {
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor pk = packed.contiguous(layout);
  const at::Tensor w = gemm_weight(weight, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "conv1x1_scatter_add_cpu", [&] {
    const Operands<scalar_t> o{pk.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                               bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                               res.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), idx.data_ptr<int32_t>()};
    with_activation(act, [&](auto A) {
      if (nhwc)
        covered_nhwc<scalar_t, decltype(A)::value>(o, g);
      else
        covered_nchw<scalar_t, decltype(A)::value>(o, g);
    });
  });
}

at::Tensor conv1x1_scatter_add_cpu(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   c10::string_view activation) {
  const char* op = "conv1x1_scatter_add";
  const Conv1x1ScatterGeometry g = check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  const std::vector<int32_t> grid = cpu::build_patch_grid(idx, g.out, op);
  const at::MemoryFormat layout = feature_layout(residual);
  const at::Tensor res = residual.contiguous(layout);
  at::Tensor out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "conv1x1_scatter_add_cpu", [&] {
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      if (layout == at::MemoryFormat::ChannelsLast)
        uncovered_nhwc<scalar_t, kA>(res.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grid.data(), g.out);
      else
        uncovered_nchw<scalar_t, kA>(res.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grid.data(), g.out);
    });
  });
  if (g.out.P > 0) run_covered(res, out, packed, idx, weight, bias_or_undefined(bias), layout, act, g);
  return out;
}

void conv1x1_scatter_add_inplace_cpu(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     c10::string_view activation) {
  const char* op = "conv1x1_scatter_add_";
  const Conv1x1ScatterGeometry g = check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  cpu::build_patch_grid(idx, g.out, op);  // in range and unique, or an error before any write
  if (g.out.P == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  // Strides we cannot address directly get a dense working copy, written back once.
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  run_covered(work, work, packed, idx, weight, bias_or_undefined(bias), layout, act, g);
  if (!work.is_same(residual)) residual.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("conv1x1_scatter_add", &conv1x1_scatter_add_cpu);
  m.impl("conv1x1_scatter_add_", &conv1x1_scatter_add_inplace_cpu);
}

}  // namespace laudnet_ops
