// CPU kernel of conv1x1_scatter_add (out of place and in place): the 1x1
// convolution of the packed patches, added to the residual with the
// activation at the positions each patch covers.
//
// The work is cut along the map: a task is a run of consecutive bands (rows
// of the patch grid, S map rows each) holding about one GEMM's worth of
// patches. For its patches, in sub-chunks of at most patches_per_chunk, one
// GEMM of their positions (rows) by the (Cin, Cout) weight writes a
// per-thread buffer small enough to stay in L2 (kBufferBytes), and the
// epilogue -- bias, residual, activation -- reads it back from cache and
// writes the map. So the (P, Cout, S, S) convolution output, which the
// unfused pair writes to memory and reads back, exists only one chunk at a
// time, and memory does not grow with P. Out of place, the task first fills
// its bands of out in one sequential pass -- act(residual) in the uncovered
// cells, the residual itself in the covered ones -- and the epilogue then adds
// the convolution into out in place, finding those pixels in cache: each
// element of out is read from the residual once.
//
// Channels_last (the fast path): packed rows (positions x Cin) are contiguous,
// and the patches of a sub-chunk are consecutive rows of packed whenever the
// indices are in row-major order (as patch_indices returns them): the GEMM
// reads packed in place. Otherwise their rows are copied into a per-thread
// buffer first. Each position's Cout results land as one contiguous pixel of
// the map. The weight is read as (Cin, Cout) row-major: free for a weight
// stored in "taps_major" order (what the blocks pass), one transposed copy per
// call otherwise.
// Contiguous: each patch is a (Cin, S*S) matrix, so a sub-chunk's patches are
// copied side by side into a (Cin x rows) buffer and the GEMM is
// (Cout x Cin) . (Cin x rows); the epilogue writes runs of up to S pixels of
// one channel row. Correct, and slower: NCHW scatters short runs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../conv1x1_scatter.h"
#include "patch_grid.h"
#include "row_gemm.h"
#include "vec_loops.h"

namespace laudnet_ops {
namespace {

// GEMM output per sub-chunk: with the sub-chunk's packed rows it stays within
// a 1 MB L2 until the epilogue has read it back.
constexpr int64_t kBufferBytes = 256 * 1024;
// Enough rows for the micro-kernel's 64-row blocks to amortise each weight panel.
constexpr int64_t kMinRows = 64;
constexpr int64_t kMaxRows = 256;
// Map bytes one task may span (its bands of residual and out): L2-sized, so a
// sparse mask does not make a task sweep a large part of the map.
constexpr int64_t kTaskMapBytes = 1024 * 1024;

struct Plan {
  int64_t patches_per_chunk, max_rows;
  std::vector<int64_t> task_bands;  // task t covers bands [task_bands[t], task_bands[t + 1])
  int64_t tasks() const { return static_cast<int64_t>(task_bands.size()) - 1; }
};

// Bands are rows (n, py) of the patch grid, N * Hp of them, in memory order.
Plan make_plan(const int32_t* grid, const Conv1x1ScatterGeometry& geo, int64_t elem_size) {
  const PatchGeometry& g = geo.out;
  const int64_t SS = g.S * g.S;
  const int64_t fit = kBufferBytes / (elem_size * std::max<int64_t>(1, g.C));
  Plan plan;
  plan.patches_per_chunk = std::max<int64_t>(1, std::clamp<int64_t>(fit, kMinRows, kMaxRows) / SS);
  plan.max_rows = plan.patches_per_chunk * SS;
  const int64_t band_bytes = std::max<int64_t>(1, g.S * g.W * g.C * elem_size);
  const int64_t max_bands = std::max<int64_t>(1, kTaskMapBytes / band_bytes);
  const int64_t bands = g.N * g.Hp;
  // A band joins the open task unless that would overflow one GEMM (leaving a small remainder GEMM)
  // or the task's span of the map.
  plan.task_bands.push_back(0);
  int64_t patches = 0;
  for (int64_t b = 0; b < bands; ++b) {
    int64_t in_band = 0;
    for (int64_t px = 0; px < g.Wp; ++px) in_band += grid[b * g.Wp + px] >= 0;
    const bool overflow = patches > 0 && patches + in_band > plan.patches_per_chunk;
    if (b > plan.task_bands.back() && (overflow || b - plan.task_bands.back() >= max_bands)) {
      plan.task_bands.push_back(b);
      patches = 0;
    }
    patches += in_band;
  }
  plan.task_bands.push_back(bands);
  return plan;
}

// The patches (rows of indices) of bands [b0, b1), in map order.
void list_patches(const int32_t* grid, int64_t b0, int64_t b1, const PatchGeometry& g, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t cell = b0 * g.Wp; cell < b1 * g.Wp; ++cell) {
    if (grid[cell] >= 0) out.push_back(grid[cell]);
  }
}

bool consecutive(const int32_t* p, int64_t count) {
  for (int64_t k = 1; k < count; ++k) {
    if (p[k] != p[0] + k) return false;
  }
  return true;
}

// Column ranges [x0, x1) of band b that no patch covers, neighbouring cells merged, so the
// copy loops below run over whole rows where a band is empty.
void uncovered_runs(const int32_t* grid, int64_t b, const PatchGeometry& g, std::vector<int64_t>& runs) {
  runs.clear();
  const int32_t* cells = grid + b * g.Wp;
  for (int64_t px = 0; px < g.Wp; ++px) {
    if (cells[px] >= 0) continue;
    const int64_t x0 = px * g.S, x1 = std::min((px + 1) * g.S, g.W);
    if (!runs.empty() && runs.back() == x0)
      runs.back() = x1;
    else
      runs.insert(runs.end(), {x0, x1});
  }
}

template <typename scalar_t, Activation A>
inline void activate_copy(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = 0; e < n; ++e) dst[e] = activate<A>(acc_t(src[e]));
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
  const int32_t* grid;
  bool fill_uncovered;  // out of place: fill dst from res first (fill_row), then update it in place
};

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

// ---------------------------------------------------------------- channels_last

// dst[c] = act(res[c] + v[c] + bias[c]) over one pixel's Cout channels.
template <typename scalar_t, Activation A>
inline void add_pixel(const scalar_t* v, const scalar_t* bias, const scalar_t* res, scalar_t* dst, int64_t C) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::residual_bias_act_floats(dst, res, v, bias, C, A == Activation::kRelu);
  } else if (bias != nullptr) {
    for (int64_t c = 0; c < C; ++c) dst[c] = activate<A>(acc_t(res[c]) + acc_t(v[c]) + acc_t(bias[c]));
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = activate<A>(acc_t(res[c]) + acc_t(v[c]));
  }
}

// Out of place, before the band's patches: dst = act(res) in its uncovered cells and dst = res
// in its covered ones, one sequential pass over the band's rows; the epilogue then adds the
// convolution in place into dst, whose pixels it finds in cache. (Leaving the covered cells
// for the epilogue to read from res measured up to 1.3x slower at keep 0.25: they are short
// runs the hardware prefetcher does not foresee.) runs are the uncovered column ranges.
template <typename scalar_t, Activation A>
void fill_row(const scalar_t* res, scalar_t* dst, const std::vector<int64_t>& runs, int64_t W, int64_t C) {
  int64_t x = 0;
  for (size_t r = 0; r < runs.size(); r += 2) {
    std::copy(res + x * C, res + runs[r] * C, dst + x * C);
    activate_copy<scalar_t, A>(res + runs[r] * C, dst + runs[r] * C, (runs[r + 1] - runs[r]) * C);
    x = runs[r + 1];
  }
  std::copy(res + x * C, res + W * C, dst + x * C);
}

template <typename scalar_t, Activation A>
void fill_band_nhwc(const Operands<scalar_t>& o, int64_t b, const std::vector<int64_t>& runs, const PatchGeometry& g) {
  const int64_t C = g.C, n = b / g.Hp, y0 = (b % g.Hp) * g.S, h = std::min(g.S, g.H - y0);
  for (int64_t i = 0; i < h; ++i) {
    const int64_t row = (n * g.H + y0 + i) * g.W * C;
    fill_row<scalar_t, A>(o.res + row, o.dst + row, runs, g.W, C);
  }
}

// Requests the pixels the epilogue will update before the GEMM runs, so they arrive while it
// computes: the patches' pixels are short runs the hardware prefetcher does not foresee.
template <typename scalar_t>
void prefetch_pixels(const Operands<scalar_t>& o, const int32_t* patches, int64_t count, const PatchGeometry& g) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  const int64_t S = g.S, C = g.C;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t p = patches[k];
    const int64_t n = o.idx[3 * p], y0 = o.idx[3 * p + 1] * S, x0 = o.idx[3 * p + 2] * S;
    const int64_t h = std::min(S, g.H - y0), w = std::min(S, g.W - x0);
    for (int64_t i = 0; i < h; ++i) {
      const int64_t first = ((n * g.H + y0 + i) * g.W + x0) * C, len = w * C;
      for (int64_t e = 0; e < len; e += kLine) {
        __builtin_prefetch(o.res + first + e, 1);
      }
    }
  }
}

template <typename scalar_t, Activation A>
void covered_nhwc(const Operands<scalar_t>& o, const int32_t* patches, int64_t count, const Conv1x1ScatterGeometry& geo,
                  scalar_t* gathered, scalar_t* buf) {
  const PatchGeometry& g = geo.out;
  const int64_t S = g.S, SS = S * S, C = g.C, Cin = geo.Cin;
  const scalar_t* rows = o.packed + static_cast<int64_t>(patches[0]) * SS * Cin;
  if (!consecutive(patches, count)) {
    for (int64_t k = 0; k < count; ++k) {
      const scalar_t* src = o.packed + static_cast<int64_t>(patches[k]) * SS * Cin;
      std::copy(src, src + SS * Cin, gathered + k * SS * Cin);
    }
    rows = gathered;
  }
  prefetch_pixels(o, patches, count, g);
  cpu::gemm_rowmajor(count * SS, C, Cin, rows, Cin, o.weight, C, buf, C);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t p = patches[k];
    const int64_t n = o.idx[3 * p], y0 = o.idx[3 * p + 1] * S, x0 = o.idx[3 * p + 2] * S;
    const int64_t h = std::min(S, g.H - y0), w = std::min(S, g.W - x0);
    for (int64_t i = 0; i < h; ++i) {
      const int64_t pix = (n * g.H + y0 + i) * g.W + x0;
      const scalar_t* v = buf + (k * S + i) * S * C;
      for (int64_t j = 0; j < w; ++j)
        add_pixel<scalar_t, A>(v + j * C, o.bias, o.res + (pix + j) * C, o.dst + (pix + j) * C, C);
    }
  }
}

// ---------------------------------------------------------------- contiguous

// As fill_band_nhwc, for the bands [b0, b0 + runs.size()) of one task, channel-major as NCHW
// memory is: per channel, the task's bands are one contiguous stretch of rows (band by band
// would hop across all C planes for every S rows: several times slower).
template <typename scalar_t, Activation A>
void fill_bands_nchw(const Operands<scalar_t>& o, int64_t b0, const std::vector<std::vector<int64_t>>& runs,
                     const PatchGeometry& g) {
  for (int64_t c = 0; c < g.C; ++c) {
    for (size_t k = 0; k < runs.size(); ++k) {
      const int64_t b = b0 + static_cast<int64_t>(k);
      const int64_t n = b / g.Hp, y0 = (b % g.Hp) * g.S, h = std::min(g.S, g.H - y0);
      for (int64_t i = 0; i < h; ++i) {
        const int64_t row = ((n * g.C + c) * g.H + y0 + i) * g.W;
        fill_row<scalar_t, A>(o.res + row, o.dst + row, runs[k], g.W, 1);
      }
    }
  }
}

template <typename scalar_t, Activation A>
void covered_nchw(const Operands<scalar_t>& o, const int32_t* patches, int64_t count, const Conv1x1ScatterGeometry& geo,
                  int64_t ld, scalar_t* cols, scalar_t* buf) {
  using acc_t = acc_of<scalar_t>;
  const PatchGeometry& g = geo.out;
  const int64_t S = g.S, SS = S * S, C = g.C, Cin = geo.Cin;
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* patch = o.packed + static_cast<int64_t>(patches[k]) * Cin * SS;
    for (int64_t ci = 0; ci < Cin; ++ci) std::copy(patch + ci * SS, patch + (ci + 1) * SS, cols + ci * ld + k * SS);
  }
  cpu::gemm_rowmajor(C, count * SS, Cin, o.weight, Cin, cols, ld, buf, ld);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t b = o.bias != nullptr ? acc_t(o.bias[c]) : acc_t(0);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t p = patches[k];
      const int64_t n = o.idx[3 * p], y0 = o.idx[3 * p + 1] * S, x0 = o.idx[3 * p + 2] * S;
      const int64_t h = std::min(S, g.H - y0), w = std::min(S, g.W - x0);
      for (int64_t i = 0; i < h; ++i) {
        const int64_t off = ((n * C + c) * g.H + y0 + i) * g.W + x0;
        const scalar_t* v = buf + c * ld + k * SS + i * S;
        const scalar_t* r = o.res + off;
        scalar_t* d = o.dst + off;
        for (int64_t j = 0; j < w; ++j) d[j] = activate<A>(acc_t(r[j]) + acc_t(v[j]) + b);
      }
    }
  }
}

// ---------------------------------------------------------------- driver

template <typename scalar_t, Activation A, bool kChannelsLast>
void run_tasks(const Operands<scalar_t>& o, const Plan& plan, const Conv1x1ScatterGeometry& geo) {
  const PatchGeometry& g = geo.out;
  const int64_t ld = plan.max_rows;
  // The covered cells are updated in place in dst (out of place, the fill pass put res there first).
  Operands<scalar_t> in_dst = o;
  in_dst.res = o.dst;
  at::parallel_for(0, plan.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> patches;
    std::vector<std::vector<int64_t>> runs;
    // Scratch the GEMM overwrites: left uninitialised.
    const std::unique_ptr<scalar_t[]> a_buf(new scalar_t[ld * geo.Cin]), c_buf(new scalar_t[ld * g.C]);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = plan.task_bands[t], b1 = plan.task_bands[t + 1];
      if (o.fill_uncovered) {
        runs.resize(b1 - b0);
        for (int64_t b = b0; b < b1; ++b) uncovered_runs(o.grid, b, g, runs[b - b0]);
        if (kChannelsLast) {
          for (int64_t b = b0; b < b1; ++b) fill_band_nhwc<scalar_t, A>(o, b, runs[b - b0], g);
        } else {
          fill_bands_nchw<scalar_t, A>(o, b0, runs, g);
        }
      }
      list_patches(o.grid, b0, b1, g, patches);
      for (int64_t k = 0; k < static_cast<int64_t>(patches.size()); k += plan.patches_per_chunk) {
        const int64_t count = std::min<int64_t>(plan.patches_per_chunk, patches.size() - k);
        if (kChannelsLast)
          covered_nhwc<scalar_t, A>(in_dst, patches.data() + k, count, geo, a_buf.get(), c_buf.get());
        else
          covered_nchw<scalar_t, A>(in_dst, patches.data() + k, count, geo, ld, a_buf.get(), c_buf.get());
      }
    }
    cpu::gemm_release<scalar_t>();
  });
}

// The weight as the GEMM reads it; a view (no copy) when it is already stored that way.
at::Tensor gemm_weight(const at::Tensor& weight, at::MemoryFormat layout) {
  const at::Tensor w2d = weight.squeeze(3).squeeze(2);  // (Cout, Cin)
  return layout == at::MemoryFormat::ChannelsLast ? w2d.t().contiguous() : w2d.contiguous();
}

// dst = act(res + conv1x1(packed) + bias) at the covered positions, and act(res) at the
// others when dst is a separate output.
void run(const at::Tensor& res, at::Tensor& dst, const at::Tensor& packed, const at::Tensor& idx,
         const std::vector<int32_t>& grid, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
         at::MemoryFormat layout, Activation act, const Conv1x1ScatterGeometry& g) {
  const at::Tensor pk = packed.contiguous(layout);
  const at::Tensor w = gemm_weight(weight, layout);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const Plan plan = make_plan(grid.data(), g, res.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "conv1x1_scatter_add_cpu", [&] {
    const Operands<scalar_t> o{pk.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                               b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                               res.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(),
                               grid.data(), !dst.is_same(res)};
    with_activation(act, [&](auto A) {
      if (layout == at::MemoryFormat::ChannelsLast)
        run_tasks<scalar_t, decltype(A)::value, true>(o, plan, g);
      else
        run_tasks<scalar_t, decltype(A)::value, false>(o, plan, g);
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
  run(res, out, packed, idx, grid, weight, bias, layout, act, g);
  return out;
}

void conv1x1_scatter_add_inplace_cpu(const at::Tensor& residual, const at::Tensor& packed, const at::Tensor& indices,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     c10::string_view activation) {
  const char* op = "conv1x1_scatter_add_";
  const Conv1x1ScatterGeometry g = check_conv1x1_scatter_args(residual, packed, indices, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  const std::vector<int32_t> grid = cpu::build_patch_grid(idx, g.out, op);  // in range and unique, before any write
  if (g.out.P == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  // Strides we cannot address directly get a dense working copy, written back once.
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  run(work, work, packed, idx, grid, weight, bias, layout, act, g);
  if (!work.is_same(residual)) residual.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("conv1x1_scatter_add", &conv1x1_scatter_add_cpu);
  m.impl("conv1x1_scatter_add_", &conv1x1_scatter_add_inplace_cpu);
}

}  // namespace laudnet_ops
