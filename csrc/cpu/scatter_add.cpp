// CPU kernels of scatter_add (out of place and in place) and of its adjoint,
// _gather_patches. Two loop orders, one per memory layout, so the innermost
// loop always runs over contiguous memory: along a row of W in NCHW, along the
// C channels of a pixel in channels_last.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../activation.h"
#include "patch_grid.h"

namespace laudnet_ops {
namespace {

constexpr int64_t kGrainElements = 32768;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item));
}

// out[n, c, y, x] = act(residual + packed patch covering (y, x), if any): one pass over out.
template <typename scalar_t, Activation A>
void scatter_nchw(const scalar_t* res, const scalar_t* pk, scalar_t* out, const int32_t* grid,
                  const PatchGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S, W = g.W;
  at::parallel_for(0, g.N * g.C * g.H, grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % g.H, c = (r / g.H) % g.C, n = r / (g.H * g.C);
      const int32_t* grid_row = grid + (n * g.Hp + y / S) * g.Wp;
      const scalar_t* res_row = res + r * W;
      scalar_t* out_row = out + r * W;
      for (int64_t px = 0; px < g.Wp; ++px) {
        const int64_t x0 = px * S, x1 = std::min(x0 + S, W);
        const int32_t p = grid_row[px];
        if (p < 0) {
          for (int64_t x = x0; x < x1; ++x) out_row[x] = activate<A>(acc_t(res_row[x]));
        } else {
          const scalar_t* pk_row = pk + ((p * g.C + c) * S + y % S) * S - x0;
          for (int64_t x = x0; x < x1; ++x)
            out_row[x] = activate<A>(acc_t(res_row[x]) + acc_t(pk_row[x]));
        }
      }
    }
  });
}

template <typename scalar_t, Activation A>
void scatter_nhwc(const scalar_t* res, const scalar_t* pk, scalar_t* out, const int32_t* grid,
                  const PatchGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.N * g.H * g.W, grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t x = pix % g.W, y = (pix / g.W) % g.H, n = pix / (g.W * g.H);
      const int32_t p = grid[(n * g.Hp + y / S) * g.Wp + x / S];
      const scalar_t* res_px = res + pix * C;
      scalar_t* out_px = out + pix * C;
      if (p < 0) {
        for (int64_t c = 0; c < C; ++c) out_px[c] = activate<A>(acc_t(res_px[c]));
      } else {
        const scalar_t* pk_px = pk + ((p * S + y % S) * S + x % S) * C;
        for (int64_t c = 0; c < C; ++c) out_px[c] = activate<A>(acc_t(res_px[c]) + acc_t(pk_px[c]));
      }
    }
  });
}

// In place: visits only the covered positions, so the cost follows P, not the map.
template <typename scalar_t, Activation A>
void scatter_inplace_nchw(scalar_t* res, const scalar_t* pk, const int32_t* idx, const PatchGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S;
  at::parallel_for(0, g.P * g.C, grain(S * S), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / g.C, c = t % g.C;
      const int64_t n = idx[3 * p], y0 = idx[3 * p + 1] * S, x0 = idx[3 * p + 2] * S;
      const int64_t rows = std::min(S, g.H - y0), cols = std::min(S, g.W - x0);
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* res_row = res + ((n * g.C + c) * g.H + y0 + i) * g.W + x0;
        const scalar_t* pk_row = pk + ((p * g.C + c) * S + i) * S;
        for (int64_t j = 0; j < cols; ++j) res_row[j] = activate<A>(acc_t(res_row[j]) + acc_t(pk_row[j]));
      }
    }
  });
}

template <typename scalar_t, Activation A>
void scatter_inplace_nhwc(scalar_t* res, const scalar_t* pk, const int32_t* idx, const PatchGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.P * S, grain(S * C), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / S, i = t % S;
      const int64_t n = idx[3 * p], y = idx[3 * p + 1] * S + i, x0 = idx[3 * p + 2] * S;
      if (y >= g.H) continue;
      const int64_t cols = std::min(S, g.W - x0);
      for (int64_t j = 0; j < cols; ++j) {
        scalar_t* res_px = res + ((n * g.H + y) * g.W + x0 + j) * C;
        const scalar_t* pk_px = pk + ((p * S + i) * S + j) * C;
        for (int64_t c = 0; c < C; ++c) res_px[c] = activate<A>(acc_t(res_px[c]) + acc_t(pk_px[c]));
      }
    }
  });
}

// out[p, c, i, j] = x[n, c, py*S + i, px*S + j], zero outside the map.
template <typename scalar_t>
void gather_nchw(const scalar_t* x, scalar_t* out, const int32_t* idx, const PatchGeometry& g) {
  const int64_t S = g.S;
  at::parallel_for(0, g.P * g.C, grain(S * S), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / g.C, c = t % g.C;
      const int64_t n = idx[3 * p], y0 = idx[3 * p + 1] * S, x0 = idx[3 * p + 2] * S;
      for (int64_t i = 0; i < S; ++i) {
        scalar_t* out_row = out + (t * S + i) * S;
        const bool row_inside = y0 + i < g.H;
        const scalar_t* x_row = x + ((n * g.C + c) * g.H + y0 + i) * g.W + x0;
        for (int64_t j = 0; j < S; ++j)
          out_row[j] = (row_inside && x0 + j < g.W) ? x_row[j] : scalar_t(0);
      }
    }
  });
}

template <typename scalar_t>
void gather_nhwc(const scalar_t* x, scalar_t* out, const int32_t* idx, const PatchGeometry& g) {
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.P * S, grain(S * C), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / S, i = t % S;
      const int64_t n = idx[3 * p], y = idx[3 * p + 1] * S + i, x0 = idx[3 * p + 2] * S;
      for (int64_t j = 0; j < S; ++j) {
        scalar_t* out_px = out + (t * S + j) * C;
        if (y < g.H && x0 + j < g.W) {
          const scalar_t* x_px = x + ((n * g.H + y) * g.W + x0 + j) * C;
          std::copy(x_px, x_px + C, out_px);
        } else {
          std::fill(out_px, out_px + C, scalar_t(0));
        }
      }
    }
  });
}

at::Tensor scatter_add_cpu(const at::Tensor& residual, const at::Tensor& packed,
                           const at::Tensor& indices, c10::string_view activation) {
  const char* op = "scatter_add";
  const PatchGeometry g = check_scatter_args(residual, packed, indices, op);
  const Activation act = parse_activation(activation, op);
  const at::MemoryFormat layout = feature_layout(residual);
  const at::Tensor res = residual.contiguous(layout), pk = packed.contiguous(layout);
  const std::vector<int32_t> grid = cpu::build_patch_grid(indices.contiguous(), g, op);
  at::Tensor out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "scatter_add_cpu", [&] {
    with_activation(act, [&](auto A) {
      const auto args = std::make_tuple(res.data_ptr<scalar_t>(), pk.data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>(), grid.data(), g);
      if (layout == at::MemoryFormat::ChannelsLast)
        std::apply(scatter_nhwc<scalar_t, decltype(A)::value>, args);
      else
        std::apply(scatter_nchw<scalar_t, decltype(A)::value>, args);
    });
  });
  return out;
}

void scatter_add_inplace_cpu(const at::Tensor& residual, const at::Tensor& packed,
                             const at::Tensor& indices, c10::string_view activation) {
  const char* op = "scatter_add_";
  const PatchGeometry g = check_scatter_args(residual, packed, indices, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = indices.contiguous();
  cpu::build_patch_grid(idx, g, op);  // in range and unique, or an error before any write
  if (g.P == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  // Strides we cannot address directly get a dense working copy, written back once.
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  const at::Tensor pk = packed.contiguous(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "scatter_add_cpu_", [&] {
    with_activation(act, [&](auto A) {
      const auto args = std::make_tuple(work.data_ptr<scalar_t>(), pk.data_ptr<scalar_t>(),
                                        idx.data_ptr<int32_t>(), g);
      if (layout == at::MemoryFormat::ChannelsLast)
        std::apply(scatter_inplace_nhwc<scalar_t, decltype(A)::value>, args);
      else
        std::apply(scatter_inplace_nchw<scalar_t, decltype(A)::value>, args);
    });
  });
  if (!work.is_same(residual)) residual.copy_(work);
}

at::Tensor gather_patches_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t patch_size) {
  const char* op = "_gather_patches";
  const PatchGeometry g = check_gather_args(x, indices, patch_size, op);
  const at::Tensor idx = indices.contiguous();
  cpu::check_rows_in_range(idx, g, op);
  const at::MemoryFormat layout = feature_layout(x);
  const at::Tensor src = x.contiguous(layout);
  at::Tensor out = at::empty({g.P, g.C, g.S, g.S}, x.options().memory_format(layout));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_patches_cpu", [&] {
    if (layout == at::MemoryFormat::ChannelsLast)
      gather_nhwc(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), g);
    else
      gather_nchw(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), g);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("scatter_add", &scatter_add_cpu);
  m.impl("scatter_add_", &scatter_add_inplace_cpu);
  m.impl("_gather_patches", &gather_patches_cpu);
}

}  // namespace laudnet_ops
